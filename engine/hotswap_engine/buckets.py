"""Pure planning of an update's byte path: who owns which tensor, where each tensor sits in a part's
host buffer, how the parts are cut into buckets, and how large the buckets and how many slots fit a
GPU memory budget.

No torch and no I/O here (an import-linter contract keeps it so), so every rule can be unit-tested
on plain numbers and every member of a group derives the same plan from the same headers.

The central invariant: a part's staged host buffer uses exactly the layout of `layout_part`, and
`plan_buckets` cuts that same layout into windows. So every bucket is one contiguous byte range of
its owner's host buffer (one large host→device copy per bucket, never one per tensor), and a tensor's
offset inside a slot is its offset in the host buffer minus the bucket's start (alignment kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

DEFAULT_ALIGNMENT = 256  # bytes; covers every dtype and the 128-byte alignment of vectorised copies
MIB = 1 << 20
GIB = 1 << 30


def align_up(value: int, alignment: int) -> int:
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class TensorItem:
    """One tensor as planning sees it: a name, a size and (for buckets) the part that owns it."""

    name: str
    nbytes: int
    part: int = 0


@dataclass(frozen=True)
class Placement:
    """Where a tensor sits inside its part's host buffer."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PartLayout:
    part: int
    placements: tuple[Placement, ...]
    nbytes: int  # the buffer's size: end of the last tensor, aligned


@dataclass(frozen=True)
class Chunk:
    """A tensor's bytes `[tensor_offset, tensor_offset + nbytes)` at `offset` inside a slot."""

    name: str
    offset: int
    nbytes: int
    tensor_offset: int
    tensor_nbytes: int


@dataclass(frozen=True)
class Bucket:
    index: int
    owner: int  # the part whose host buffer holds these bytes
    host_offset: int  # start of the bucket in the owner part's host buffer
    nbytes: int  # bytes to move: from the first chunk's start to the last chunk's end
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class BucketPlan:
    bucket_bytes: int
    alignment: int
    parts: tuple[PartLayout, ...]
    buckets: tuple[Bucket, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes moved by the update (what progress counts up to)."""
        return sum(b.nbytes for b in self.buckets)

    @property
    def largest_chunked_tensor(self) -> int:
        """Bytes of the largest tensor that arrives in several chunks (0 when none does)."""
        return max(
            (c.tensor_nbytes for b in self.buckets for c in b.chunks if c.nbytes != c.tensor_nbytes),
            default=0,
        )


def _check_items(items: Iterable[TensorItem]) -> list[TensorItem]:
    listed = list(items)
    seen: set[str] = set()
    for item in listed:
        if item.nbytes < 0:
            raise ValueError(f"tensor {item.name!r} has a negative size {item.nbytes}")
        if item.part < 0:
            raise ValueError(f"tensor {item.name!r} has a negative part {item.part}")
        if item.name in seen:
            raise ValueError(f"tensor {item.name!r} is listed twice")
        seen.add(item.name)
    return listed


def assign_parts(tensors: Iterable[tuple[str, int]], count: int) -> dict[str, int]:
    """Assign every tensor to one of `count` parts, balancing bytes.

    Largest tensors first, each to the part with the fewest bytes so far (ties: lowest part index),
    names break ties between equal sizes: the result depends only on the set of (name, size) pairs,
    never on the order they are given in, so every agent computes the same assignment. The largest
    part exceeds the mean by at most one tensor.
    """
    if count < 1:
        raise ValueError(f"part count must be at least 1, got {count}")
    items = _check_items(TensorItem(name, nbytes) for name, nbytes in tensors)
    loads = [0] * count
    assignment: dict[str, int] = {}
    for item in sorted(items, key=lambda t: (-t.nbytes, t.name)):
        part = min(range(count), key=lambda p: (loads[p], p))
        assignment[item.name] = part
        loads[part] += item.nbytes
    return assignment


def layout_part(items: Iterable[TensorItem], part: int, alignment: int = DEFAULT_ALIGNMENT) -> PartLayout:
    """The host-buffer layout of one part: its tensors by name, each at an aligned offset."""
    align_up(0, alignment)  # validates alignment
    owned = sorted((t for t in _check_items(items) if t.part == part), key=lambda t: t.name)
    placements: list[Placement] = []
    cursor = 0
    for item in owned:
        cursor = align_up(cursor, alignment)
        placements.append(Placement(item.name, cursor, item.nbytes))
        cursor += item.nbytes
    return PartLayout(part, tuple(placements), align_up(cursor, alignment))


def _cut_part(layout: PartLayout, bucket_bytes: int) -> list[tuple[int, int, list[Chunk]]]:
    """Cut a part's layout into windows (host_offset, nbytes, chunks) of at most `bucket_bytes`.

    A tensor that fits in a bucket is never split (the receiver can use it in place); one that does
    not is cut into chunks of exactly `bucket_bytes` (a multiple of the alignment, so every chunk
    starts aligned), and its last chunk shares a bucket with the tensors after it.
    """
    windows: list[tuple[int, int, list[Chunk]]] = []
    start: int | None = None
    chunks: list[Chunk] = []

    def close(end: int) -> None:
        nonlocal start, chunks
        if start is not None and chunks:
            windows.append((start, end - start, chunks))
        start, chunks = None, []

    for p in layout.placements:
        if p.nbytes <= bucket_bytes:
            if start is not None and p.offset + p.nbytes - start > bucket_bytes:
                close(chunks[-1].offset + chunks[-1].nbytes + start)
            if start is None:
                start = p.offset
            chunks.append(Chunk(p.name, p.offset - start, p.nbytes, 0, p.nbytes))
            continue
        # Larger than a bucket: close what is open, emit full chunks, keep the tail open.
        if start is not None:
            close(chunks[-1].offset + chunks[-1].nbytes + start)
        done = 0
        while p.nbytes - done > bucket_bytes:
            windows.append((p.offset + done, bucket_bytes, [Chunk(p.name, 0, bucket_bytes, done, p.nbytes)]))
            done += bucket_bytes
        start = p.offset + done
        chunks = [Chunk(p.name, 0, p.nbytes - done, done, p.nbytes)]
    if start is not None and chunks:
        close(chunks[-1].offset + chunks[-1].nbytes + start)
    return windows


def plan_buckets(
    items: Iterable[TensorItem], bucket_bytes: int, alignment: int = DEFAULT_ALIGNMENT
) -> BucketPlan:
    """Cut every part's layout into buckets and order them for the pipeline.

    Buckets of different owners are interleaved by their position in the owner's buffer, so while
    one member's bucket is being broadcast the next owner is already copying its own: with balanced
    parts every member's host→device link works at once. Zero-byte tensors ride along in a bucket
    (they still need to reach the receiver) with no bytes of their own.
    """
    if bucket_bytes <= 0 or bucket_bytes % alignment:
        raise ValueError(
            f"bucket size {bucket_bytes} must be a positive multiple of the alignment {alignment}"
        )
    listed = _check_items(items)
    count = max((t.part for t in listed), default=-1) + 1
    parts = tuple(layout_part(listed, part, alignment) for part in range(count))
    windows = [
        (host_offset, part.part, n, chunks)
        for part in parts
        for host_offset, n, chunks in _cut_part(part, bucket_bytes)
    ]
    # Interleave owners by relative position in their buffers (ties: part index).
    windows.sort(key=lambda w: (w[0] / max(parts[w[1]].nbytes, 1), w[1], w[0]))
    buckets = tuple(
        Bucket(index, owner, host_offset, nbytes, tuple(chunks))
        for index, (host_offset, owner, nbytes, chunks) in enumerate(windows)
    )
    return BucketPlan(bucket_bytes, alignment, parts, buckets)


@dataclass(frozen=True)
class Layout:
    bucket_bytes: int
    slots: int
    reassembly_bytes: int  # receiver memory for the largest chunked tensor (0: none is chunked)

    @property
    def gpu_bytes(self) -> int:
        return self.bucket_bytes * self.slots + self.reassembly_bytes


def choose_layout(
    memory_budget_bytes: int,
    largest_tensor_bytes: int,
    total_bytes: int | None = None,
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    reserve_bytes: int = 64 * MIB,
    max_bucket_bytes: int = 256 * MIB,
    min_bucket_bytes: int = 1 * MIB,
    preferred_slots: Sequence[int] = (4, 3, 2),
    reassemble: bool = True,
) -> Layout:
    """Pick a bucket size and slot count whose GPU memory stays within `memory_budget_bytes`.

    The cost per GPU is `slots × bucket` (the agent's slots, which the receiver maps through IPC, so
    they count once) plus `reserve_bytes` for the collective library's own buffers, plus, when the
    receiver rebuilds whole tensors (`reassemble`), one buffer for the largest tensor that does not
    fit in a bucket. The most slots first (up to 4), then the largest bucket that fits; at least 2 slots
    so copy, broadcast and hand-off overlap; 4 slots of up to 256 MiB measured at 97–99% of the host→GPU
    bound on 2×H200. Buckets are never larger than the update itself.
    """
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget_bytes}")
    if largest_tensor_bytes < 0:
        raise ValueError(f"largest tensor size must not be negative, got {largest_tensor_bytes}")
    cap = max_bucket_bytes
    if total_bytes is not None:
        cap = min(cap, max(align_up(total_bytes, alignment), min_bucket_bytes))
    cap = max(align_up(cap, alignment), alignment)
    candidates: list[int] = []
    size = cap
    while size >= min_bucket_bytes:
        candidates.append(size)
        size = align_up(size // 2, alignment) if size // 2 >= min_bucket_bytes else 0
    # Slot count first: fewer than 4 slots starves the pipeline sooner than smaller buckets do.
    for slots in preferred_slots:
        for bucket in candidates:
            reassembly = largest_tensor_bytes if reassemble and largest_tensor_bytes > bucket else 0
            if slots * bucket + reassembly + reserve_bytes <= memory_budget_bytes:
                return Layout(bucket, slots, reassembly)
    need = 2 * min_bucket_bytes + reserve_bytes + (largest_tensor_bytes if reassemble else 0)
    raise ValueError(
        f"a memory budget of {memory_budget_bytes} bytes is too small: at least {need} bytes are needed "
        f"(2 slots of {min_bucket_bytes}, {reserve_bytes} reserved"
        + (f", and {largest_tensor_bytes} to rebuild the largest tensor)" if reassemble else ")")
    )


def owners_by_part(member_parts: Mapping[int, tuple[int, int] | None], count: int) -> dict[int, int]:
    """For each part index, the rank that broadcasts it: the lowest rank holding that part, or else
    the lowest rank holding the whole checkpoint (`None`). `member_parts` maps rank → (index, count).
    Raises if a part has no holder or a member's part count differs from `count`."""
    owners: dict[int, int] = {}
    for rank in sorted(member_parts):
        held = member_parts[rank]
        if held is None:
            continue
        index, held_count = held
        if held_count != count:
            raise ValueError(
                f"rank {rank} holds part {index} of {held_count}, but the plan has {count} parts"
            )
        owners.setdefault(index, rank)
    complete = sorted(r for r, held in member_parts.items() if held is None)
    for part in range(count):
        if part not in owners:
            if not complete:
                raise ValueError(f"no member holds part {part} of {count}")
            owners[part] = complete[0]
    return owners
