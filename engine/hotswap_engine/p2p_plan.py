"""Pure planning of a peer-to-peer catch-up: which byte ranges of the new version to read from
which peer, in chunks, balanced over the peers, every needed byte exactly once, and how to resume
the ranges a vanished peer still owed.

No torch and no I/O here (`transport.p2p` does the reading), so every rule is unit-tested on plain
numbers and the same inputs always give the same plan.

Coordinates. The reader fills one contiguous destination buffer laid out by a `VersionLayout` (a
tensor table: name, dtype, shape, offset, nbytes); planning works in that buffer's byte offsets. A
peer ("holder") may lay the same tensors out differently, even over several buffers (a complete
version assembled by a broadcast keeps one buffer per part), and may hold only some tensors (a
part). `Holder.from_layouts` matches the two tables by tensor name and turns them into
`HeldSegment`s: "destination bytes [start, start+length) are at `offset` of my buffer `buffer`".

Padding. Tensors sit at aligned offsets, so a layout has gaps. Tensor bytes are mandatory; gap bytes
are read only when a holder has them anyway (then one read can span many small tensors instead of
one read per tensor), and skipped otherwise. A plan's reads never overlap.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
DEFAULT_CHUNK_BYTES = 64 * MIB  # one read: large enough to amortise a request, small enough to rebalance


class LayoutMismatch(ValueError):
    """A holder's tensor table does not describe the same tensors as the destination's."""


class NoHolderLeft(RuntimeError):
    """Some needed bytes are held by no (remaining) peer; the caller falls back to staging the
    version from its source."""

    def __init__(self, missing: Sequence[ByteRange], failed: Sequence[str] = ()) -> None:
        self.missing = tuple(missing)
        self.failed = tuple(failed)
        shown = ", ".join(f"[{r.start}, {r.end})" for r in self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        lost = f" after losing {', '.join(self.failed)}" if self.failed else ""
        super().__init__(
            f"no peer holds {sum(r.length for r in self.missing)} needed bytes{lost}: {shown}{more}; "
            "stage the version from its source instead"
        )


@dataclass(frozen=True, order=True)
class ByteRange:
    """Bytes `[start, end)`."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start


def merge_ranges(ranges: Iterable[ByteRange]) -> tuple[ByteRange, ...]:
    """Sorted, with overlapping and touching ranges joined and empty ones dropped."""
    merged: list[ByteRange] = []
    for r in sorted(r for r in ranges if r.length):
        if merged and r.start <= merged[-1].end:
            if r.end > merged[-1].end:
                merged[-1] = ByteRange(merged[-1].start, r.end)
        else:
            merged.append(r)
    return tuple(merged)


def intersect_ranges(a: Sequence[ByteRange], b: Sequence[ByteRange]) -> tuple[ByteRange, ...]:
    """Intersection of two sets of ranges (each is merged first)."""
    left, right = merge_ranges(a), merge_ranges(b)
    out: list[ByteRange] = []
    i = j = 0
    while i < len(left) and j < len(right):
        start, end = max(left[i].start, right[j].start), min(left[i].end, right[j].end)
        if start < end:
            out.append(ByteRange(start, end))
        if left[i].end < right[j].end:
            i += 1
        else:
            j += 1
    return tuple(out)


def _covers(merged: Sequence[ByteRange], starts: Sequence[int], start: int, end: int) -> bool:
    """Whether `[start, end)` lies inside one range of `merged` (sorted, merged; `starts` its starts)."""
    i = bisect.bisect_right(starts, start) - 1
    return i >= 0 and merged[i].end >= end


def _touches(merged: Sequence[ByteRange], starts: Sequence[int], start: int, end: int) -> bool:
    """Whether `[start, end)` overlaps any range of `merged`."""
    i = bisect.bisect_right(starts, start) - 1
    if i >= 0 and merged[i].end > start:
        return True
    return i + 1 < len(merged) and merged[i + 1].start < end


# ---- layouts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a host buffer: bytes `[offset, offset + nbytes)` of buffer `segment`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    segment: int = 0


@dataclass(frozen=True)
class VersionLayout:
    """A tensor table over one or more host buffers (`segments`: (buffer id, size) pairs)."""

    tensors: tuple[TensorEntry, ...]
    segments: tuple[tuple[int, int], ...]
    _by_name: dict[str, TensorEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes: dict[int, int] = {}
        for seg, size in self.segments:
            if seg in sizes or size < 0:
                raise ValueError(f"segment {seg} is listed twice or has a negative size")
            sizes[seg] = size
        by_name: dict[str, TensorEntry] = {}
        ends: dict[int, list[tuple[int, int, str]]] = {}
        for t in self.tensors:
            if t.name in by_name:
                raise ValueError(f"tensor {t.name!r} is listed twice")
            by_name[t.name] = t
            if t.segment not in sizes:
                raise ValueError(f"tensor {t.name!r} lies in unknown segment {t.segment}")
            if t.offset < 0 or t.nbytes < 0 or t.offset + t.nbytes > sizes[t.segment]:
                raise ValueError(
                    f"tensor {t.name!r} [{t.offset}, {t.offset + t.nbytes}) exceeds segment {t.segment} "
                    f"of {sizes[t.segment]} bytes"
                )
            ends.setdefault(t.segment, []).append((t.offset, t.offset + t.nbytes, t.name))
        for seg, spans in ends.items():
            spans.sort()
            for (_, end, name), (start, _, other) in itertools.pairwise(spans):
                if start < end:
                    raise ValueError(f"tensors {name!r} and {other!r} overlap in segment {seg}")
        object.__setattr__(self, "_by_name", by_name)

    @classmethod
    def single(cls, tensors: Iterable[TensorEntry], nbytes: int) -> VersionLayout:
        """A layout over one buffer (id 0) of `nbytes`."""
        return cls(tuple(sorted(tensors, key=lambda t: (t.offset, t.name))), ((0, nbytes),))

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def get(self, name: str) -> TensorEntry | None:
        return self._by_name.get(name)

    def required_ranges(self) -> tuple[ByteRange, ...]:
        """The tensor bytes of a single-buffer layout (what a reader must fill)."""
        if len(self.segments) != 1:
            raise ValueError("a destination layout must describe exactly one buffer")
        return merge_ranges(ByteRange(t.offset, t.offset + t.nbytes) for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "segments": [[seg, size] for seg, size in self.segments],
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.offset, t.nbytes, t.segment]
                for t in sorted(self.tensors, key=lambda t: (t.segment, t.offset, t.name))
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VersionLayout:
        """The inverse of `to_json`; raises ValueError on anything malformed (it comes off the wire)."""
        try:
            segments = tuple((int(seg), int(size)) for seg, size in data["segments"])
            tensors = tuple(
                TensorEntry(str(name), str(dtype), tuple(int(d) for d in shape), int(off), int(n), int(seg))
                for name, dtype, shape, off, n, seg in data["tensors"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed layout: {e}") from e
        return cls(tensors, segments)

    def encode(self) -> bytes:
        """Canonical JSON bytes: equal layouts encode to equal bytes (the digest relies on it)."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()


# ---- holders --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldSegment:
    """Destination bytes `[start, start + length)` sit at `offset` of the holder's buffer `buffer`."""

    start: int
    length: int
    buffer: int = 0
    offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ReadTask:
    """One read: `length` bytes at `offset` of `holder`'s buffer `buffer` into destination `start`."""

    holder: str
    start: int
    length: int
    buffer: int
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def range(self) -> ByteRange:
        return ByteRange(self.start, self.end)


@dataclass(frozen=True)
class Holder:
    """A peer and what it holds, in destination coordinates (segments sorted, not overlapping)."""

    name: str
    segments: tuple[HeldSegment, ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        segs = tuple(sorted((s for s in self.segments if s.length), key=lambda s: s.start))
        for s in segs:
            if s.start < 0 or s.length < 0 or s.offset < 0:
                raise ValueError(f"holder {self.name!r}: invalid segment {s}")
        for a, b in itertools.pairwise(segs):
            if b.start < a.end:
                raise ValueError(f"holder {self.name!r}: segments {a} and {b} overlap")
        object.__setattr__(self, "segments", segs)
        object.__setattr__(self, "_starts", tuple(s.start for s in segs))

    @classmethod
    def whole(cls, name: str, nbytes: int) -> Holder:
        """A holder whose buffer 0 is laid out exactly like the destination."""
        return cls(name, (HeldSegment(0, nbytes, 0, 0),))

    @classmethod
    def from_layouts(cls, name: str, dest: VersionLayout, held: VersionLayout) -> Holder:
        """Match `held` (the peer's table) to `dest` by tensor name.

        Consecutive tensors that are laid out alike on both sides become one segment, padding
        between them included, but only where the destination's gap holds no tensor the peer lacks.
        """
        required = dest.required_ranges()
        starts = [r.start for r in required]
        pieces: list[HeldSegment] = []
        for t in held.tensors:
            d = dest.get(t.name)
            if d is None:
                raise LayoutMismatch(f"peer {name!r} holds {t.name!r}, which the destination lacks")
            if (d.dtype, tuple(d.shape), d.nbytes) != (t.dtype, tuple(t.shape), t.nbytes):
                raise LayoutMismatch(
                    f"peer {name!r}: tensor {t.name!r} is {t.dtype}{list(t.shape)} ({t.nbytes} bytes) "
                    f"there but {d.dtype}{list(d.shape)} ({d.nbytes} bytes) here"
                )
            if t.nbytes:
                pieces.append(HeldSegment(d.offset, t.nbytes, t.segment, t.offset))
        pieces.sort(key=lambda s: s.start)
        merged: list[HeldSegment] = []
        for s in pieces:
            if merged:
                p = merged[-1]
                gap = s.start - p.end
                if (
                    gap >= 0
                    and s.buffer == p.buffer
                    and s.offset - (p.offset + p.length) == gap
                    and not (gap and _touches(required, starts, p.end, s.start))
                ):
                    merged[-1] = HeldSegment(p.start, s.end - p.start, p.buffer, p.offset)
                    continue
            merged.append(s)
        return cls(name, tuple(merged))

    def covered(self) -> tuple[ByteRange, ...]:
        return merge_ranges(ByteRange(s.start, s.end) for s in self.segments)

    def locate(self, start: int, length: int) -> tuple[ReadTask, ...] | None:
        """The reads that fetch destination bytes `[start, start + length)` from this holder (split
        where its segments are not contiguous in its buffers), or None if it lacks any of them."""
        end = start + length
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            return None
        reads: list[ReadTask] = []
        pos = start
        while pos < end:
            if i >= len(self.segments):
                return None
            s = self.segments[i]
            if not s.start <= pos < s.end:
                return None
            piece = min(end, s.end) - pos
            reads.append(ReadTask(self.name, pos, piece, s.buffer, s.offset + pos - s.start))
            pos += piece
            i += 1
        return tuple(reads)


# ---- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadPlan:
    layout: VersionLayout  # the destination's
    holders: tuple[Holder, ...]
    chunk_bytes: int
    tasks: tuple[ReadTask, ...]  # by destination offset; no two overlap

    @property
    def total_bytes(self) -> int:
        return sum(t.length for t in self.tasks)

    def holder(self, name: str) -> Holder:
        for h in self.holders:
            if h.name == name:
                return h
        raise KeyError(name)

    def bytes_by_holder(self) -> dict[str, int]:
        out = {h.name: 0 for h in self.holders}
        for t in self.tasks:
            out[t.holder] += t.length
        return out

    def tasks_by_holder(self) -> dict[str, list[ReadTask]]:
        out: dict[str, list[ReadTask]] = {h.name: [] for h in self.holders}
        for t in self.tasks:
            out[t.holder].append(t)
        return out

    def ranges(self) -> tuple[ByteRange, ...]:
        return merge_ranges(t.range for t in self.tasks)


def _grid_cuts(start: int, end: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """`[start, end)` cut at multiples of `chunk_bytes`, so replans cut where the first plan did."""
    cuts: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        nxt = min(end, (pos // chunk_bytes + 1) * chunk_bytes)
        cuts.append((pos, nxt))
        pos = nxt
    return cuts


def plan_reads(
    layout: VersionLayout,
    holders: Sequence[Holder],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    within: Iterable[ByteRange] | None = None,
    failed: Sequence[str] = (),
) -> ReadPlan:
    """Reads that fill the destination (or only the ranges `within`) from `holders`.

    Every tensor byte exactly once; padding only where it joins reads. Reads are at most
    `chunk_bytes`, cut on a fixed grid, and balanced: chunks with the fewest possible holders are
    placed first, each on its least-loaded possible holder (ties: holder name). Raises
    `NoHolderLeft` listing the tensor bytes no holder has (`failed` only goes into its message).
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    names = [h.name for h in holders]
    if len(set(names)) != len(names):
        raise ValueError(f"holder names must be unique, got {names}")
    required = layout.required_ranges()
    total = layout.total_bytes
    for h in holders:
        if h.segments and h.segments[-1].end > total:
            raise ValueError(f"holder {h.name!r} claims bytes past the destination's {total}")
    window = merge_ranges(within) if within is not None else (ByteRange(0, total),)
    mandatory = intersect_ranges(required, window)
    mandatory_starts = [r.start for r in mandatory]
    ordered = sorted(holders, key=lambda h: h.name)
    coverage = [(h.name, h.covered()) for h in ordered]
    coverage_starts = [[r.start for r in cov] for _, cov in coverage]

    points: set[int] = set()
    for w in window:
        points.update((w.start, w.end))
    for r in mandatory:
        points.update((r.start, r.end))
    for _, cov in coverage:
        for r in cov:
            points.update((r.start, r.end))
    window_starts = [w.start for w in window]
    cuts = sorted(points)

    # Elementary intervals (coverage by every holder is constant inside one) joined into runs of
    # equal candidates. A padding interval extends the run before it when every candidate of that
    # run has it (so the read goes on across it), and is skipped otherwise.
    runs: list[tuple[int, int, tuple[str, ...]]] = []
    missing: list[ByteRange] = []
    for a, b in itertools.pairwise(cuts):
        if not _covers(window, window_starts, a, b):
            continue
        candidates = tuple(
            name
            for (name, cov), starts in zip(coverage, coverage_starts, strict=True)
            if _covers(cov, starts, a, b)
        )
        needed = _touches(mandatory, mandatory_starts, a, b)
        if not needed:
            if runs and runs[-1][1] == a and set(runs[-1][2]) <= set(candidates):
                runs[-1] = (runs[-1][0], b, runs[-1][2])
            continue
        if not candidates:
            missing.append(ByteRange(a, b))
        elif runs and runs[-1][1] == a and runs[-1][2] == candidates:
            runs[-1] = (runs[-1][0], b, candidates)
        else:
            runs.append((a, b, candidates))
    if missing:
        raise NoHolderLeft(merge_ranges(missing), failed)

    # A run's trailing padding is not worth reading: end each run at its last needed byte. Then
    # cut on the grid; a piece holding only padding is dropped too.
    mandatory_ends = [r.end for r in mandatory]
    chunks: list[tuple[int, int, tuple[str, ...]]] = []
    for ra, rb, cands in runs:
        last = bisect.bisect_left(mandatory_ends, rb)
        if last < len(mandatory) and mandatory[last].start < rb:
            end = rb  # a needed range runs on past (or exactly to) the run's end
        else:
            end = min(rb, mandatory_ends[last - 1]) if last else rb
        chunks.extend(
            (a, b, cands)
            for a, b in _grid_cuts(ra, end, chunk_bytes)
            if _touches(mandatory, mandatory_starts, a, b)
        )

    load = {name: 0 for name in names}
    assigned: list[tuple[int, int, str]] = []
    for a, b, cands in sorted(chunks, key=lambda c: (len(c[2]), c[0])):
        pick = min(cands, key=lambda n: (load[n], n))
        load[pick] += b - a
        assigned.append((a, b, pick))
    assigned.sort()

    by_name = {h.name: h for h in holders}
    tasks: list[ReadTask] = []
    for a, b, name in assigned:
        reads = by_name[name].locate(a, b - a)
        if reads is None:  # pragma: no cover - candidates were chosen by coverage
            raise AssertionError(f"holder {name!r} was chosen for [{a}, {b}) it does not hold")
        for t in reads:
            prev = tasks[-1] if tasks else None
            if (
                prev is not None
                and prev.holder == t.holder
                and prev.end == t.start
                and prev.buffer == t.buffer
                and prev.offset + prev.length == t.offset
                and prev.length + t.length <= chunk_bytes
            ):
                tasks[-1] = ReadTask(
                    prev.holder, prev.start, prev.length + t.length, prev.buffer, prev.offset
                )
            else:
                tasks.append(t)
    return ReadPlan(layout, tuple(holders), chunk_bytes, tuple(tasks))


def replan(plan: ReadPlan, remaining: Iterable[ByteRange], failed: str | Iterable[str]) -> ReadPlan:
    """Plan `remaining` (ranges not yet read) again without the `failed` holder(s).

    Raises `NoHolderLeft` when the other holders lack some of the remaining tensor bytes.
    """
    lost = {failed} if isinstance(failed, str) else set(failed)
    holders = [h for h in plan.holders if h.name not in lost]
    return plan_reads(plan.layout, holders, plan.chunk_bytes, within=remaining, failed=sorted(lost))
