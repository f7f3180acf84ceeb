"""Peer-to-peer read planning over many random layouts and holder sets.

Every plan is executed on plain byte arrays: each holder's buffers are filled from the same
"version" through the holder's own layout, the plan's reads copy holder bytes into a destination,
and the destination's tensor bytes must equal the version's. Failures are simulated by dropping a
holder part-way and resuming with `replan`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hotswap_engine import buckets
from hotswap_engine.p2p_plan import (
    ByteRange,
    HeldSegment,
    Holder,
    LayoutMismatch,
    NoHolderLeft,
    ReadPlan,
    ReadTask,
    TensorEntry,
    VersionLayout,
    intersect_ranges,
    merge_ranges,
    plan_reads,
    replan,
)

DTYPE_SIZE = {"BF16": 2, "F32": 4, "U8": 1}


@dataclass
class Peer:
    holder: Holder
    buffers: dict[int, bytearray]
    layout: VersionLayout


def _tensors(rng: random.Random, count: int) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for i in range(count):
        dtype = rng.choice(list(DTYPE_SIZE))
        kind = rng.random()
        if kind < 0.1:
            shape: tuple[int, ...] = (0,)
        elif kind < 0.6:
            shape = (rng.randint(1, 40),)
        else:
            shape = (rng.randint(1, 64), rng.randint(1, 96))
        out.append((f"t{i:03d}", dtype, shape))
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZE[dtype]
    for d in shape:
        n *= d
    return n


def _layout(
    specs: list[tuple[str, str, tuple[int, ...]]], parts: dict[str, int], keep: set[int], alignment: int
) -> VersionLayout:
    """The layout `staging` gives: one buffer per kept part, laid out by `buckets.layout_part`."""
    items = [buckets.TensorItem(name, _nbytes(dtype, shape), parts[name]) for name, dtype, shape in specs]
    by_name = {name: (dtype, shape) for name, dtype, shape in specs}
    tensors: list[TensorEntry] = []
    segments: list[tuple[int, int]] = []
    for part in sorted(keep):
        lay = buckets.layout_part(items, part, alignment)
        segments.append((part, lay.nbytes))
        for p in lay.placements:
            dtype, shape = by_name[p.name]
            tensors.append(TensorEntry(p.name, dtype, shape, p.offset, p.nbytes, part))
    return VersionLayout(tuple(tensors), tuple(segments))


def _content(name: str, nbytes: int) -> bytes:
    return random.Random(name).randbytes(nbytes)


def _fill(layout: VersionLayout, junk: int) -> dict[int, bytearray]:
    """Buffers holding each tensor's bytes; padding holds junk so reading it is harmless but visible."""
    bufs = {seg: bytearray([junk]) * size for seg, size in layout.segments}
    for t in layout.tensors:
        bufs[t.segment][t.offset : t.offset + t.nbytes] = _content(t.name, t.nbytes)
    return bufs


def _scenario(seed: int) -> tuple[VersionLayout, list[Peer]]:
    rng = random.Random(seed)
    specs = _tensors(rng, rng.randint(1, 40))
    count = rng.randint(1, 4)
    parts = buckets.assign_parts(((n, _nbytes(d, s)) for n, d, s in specs), count)
    dest = _layout(specs, dict.fromkeys(parts, 0), {0}, rng.choice([1, 64, 256]))
    peers: list[Peer] = []
    for i in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.4:  # a complete version over several part buffers (what a broadcast leaves)
            lay = _layout(specs, parts, set(range(count)), rng.choice([64, 256]))
        elif kind < 0.6:  # a complete version laid out exactly like the destination
            lay = dest
        else:  # a part holder (or several parts)
            owned = set(rng.sample(range(count), rng.randint(1, count)))
            lay = _layout(specs, parts, owned, rng.choice([64, 256]))
        peers.append(Peer(Holder.from_layouts(f"peer-{i}", dest, lay), _fill(lay, 0xEE), lay))
    rng.shuffle(peers)
    return dest, peers


def _execute(tasks: tuple[ReadTask, ...], peers: dict[str, Peer], dest: bytearray) -> None:
    for t in tasks:
        src = peers[t.holder].buffers[t.buffer]
        assert t.offset + t.length <= len(src), t
        dest[t.start : t.end] = src[t.offset : t.offset + t.length]


def _check_plan(plan: ReadPlan, layout: VersionLayout, within: tuple[ByteRange, ...] | None = None) -> None:
    required = layout.required_ranges()
    window = within if within is not None else (ByteRange(0, layout.total_bytes),)
    mandatory = intersect_ranges(required, window)
    ordered = sorted(plan.tasks, key=lambda t: t.start)
    assert list(plan.tasks) == ordered
    for a, b in itertools.pairwise(ordered):
        assert a.end <= b.start, f"reads overlap: {a} {b}"
    for t in plan.tasks:
        assert 0 < t.length <= plan.chunk_bytes
        # every read lies inside the requested window and touches needed bytes
        assert intersect_ranges([t.range], window) == (t.range,)
        assert intersect_ranges([t.range], mandatory), t
        assert plan.holder(t.holder).locate(t.start, t.length) is not None
    got = plan.ranges()
    assert intersect_ranges(got, mandatory) == merge_ranges(mandatory), "some needed bytes are never read"


def _tensor_bytes_equal(layout: VersionLayout, dest: bytearray) -> None:
    for t in layout.tensors:
        assert dest[t.offset : t.offset + t.nbytes] == _content(t.name, t.nbytes), t.name


def _coverable(layout: VersionLayout, holders: list[Holder]) -> bool:
    covered = merge_ranges(r for h in holders for r in h.covered())
    need = layout.required_ranges()
    return intersect_ranges(need, covered) == need


@pytest.mark.parametrize("seed", range(200))
def test_random_plans_fill_every_tensor_byte_exactly_once(seed: int) -> None:
    layout, peers = _scenario(seed)
    holders = [p.holder for p in peers]
    chunk = random.Random(seed).choice([256, 1000, 4096, 1 << 20])
    if not _coverable(layout, holders):
        with pytest.raises(NoHolderLeft) as err:
            plan_reads(layout, holders, chunk)
        assert err.value.missing
        covered = merge_ranges(r for h in holders for r in h.covered())
        for r in err.value.missing:
            assert not intersect_ranges([r], covered)
        return
    plan = plan_reads(layout, holders, chunk)
    _check_plan(plan, layout)
    dest = bytearray(layout.total_bytes)
    _execute(plan.tasks, {p.holder.name: p for p in peers}, dest)
    _tensor_bytes_equal(layout, dest)
    # Deterministic: the same holders in another order give the same plan.
    again = plan_reads(layout, list(reversed(holders)), chunk)
    assert again.tasks == plan.tasks


@pytest.mark.parametrize("seed", range(200))
def test_replan_after_a_holder_vanishes_midway(seed: int) -> None:
    layout, peers = _scenario(seed)
    holders = [p.holder for p in peers]
    if not _coverable(layout, holders):
        return  # covered by the test above
    rng = random.Random(seed + 1)
    chunk = rng.choice([256, 4096])
    plan = plan_reads(layout, holders, chunk)
    by_name = {p.holder.name: p for p in peers}
    failed = rng.choice(holders).name
    done_before = rng.randint(0, len(plan.tasks))
    dest = bytearray(layout.total_bytes)
    remaining: list[ByteRange] = []
    for i, t in enumerate(plan.tasks):
        if t.holder == failed and i >= done_before:
            remaining.append(t.range)  # never arrived
        else:
            _execute((t,), by_name, dest)
    others = [h for h in holders if h.name != failed]
    need = intersect_ranges(layout.required_ranges(), remaining)
    covered = merge_ranges(r for h in others for r in h.covered())
    if intersect_ranges(need, covered) != merge_ranges(need):
        with pytest.raises(NoHolderLeft) as err:
            replan(plan, remaining, failed)
        assert failed in str(err.value)
        return
    again = replan(plan, remaining, failed)
    assert all(t.holder != failed for t in again.tasks)
    _check_plan(again, layout, merge_ranges(remaining))
    _execute(again.tasks, by_name, dest)
    _tensor_bytes_equal(layout, dest)


def _full(n: int, names: list[str], total: int) -> list[Holder]:
    return [Holder.whole(name, total) for name in names[:n]]


@pytest.mark.parametrize("holders", [1, 2, 3, 5])
def test_full_holders_share_the_load_within_one_chunk(holders: int) -> None:
    total = 10 * 64 + 17
    layout = VersionLayout.single([TensorEntry("w", "U8", (total,), 0, total)], total)
    plan = plan_reads(layout, _full(holders, ["c", "a", "b", "e", "d"], total), chunk_bytes=64)
    loads = plan.bytes_by_holder()
    assert sum(loads.values()) == total
    assert max(loads.values()) - min(loads.values()) <= 64
    # consecutive chunks go to different holders, so every peer works from the start
    if holders > 1:
        assert len({t.holder for t in plan.tasks[:holders]}) == holders


def test_full_layout_reads_across_padding_in_large_chunks() -> None:
    specs = [TensorEntry(f"t{i}", "U8", (100,), i * 256, 100) for i in range(1000)]
    layout = VersionLayout.single(specs, 1000 * 256)
    plan = plan_reads(layout, [Holder.whole("a", layout.total_bytes)], chunk_bytes=64 << 10)
    # one read per 64 KiB, not one per tensor; the tail padding after the last tensor is skipped
    assert len(plan.tasks) == -(-(999 * 256 + 100) // (64 << 10))
    assert plan.tasks[-1].end == 999 * 256 + 100


def test_padding_is_never_claimed_over_a_tensor_the_peer_lacks() -> None:
    dest = VersionLayout.single(
        [
            TensorEntry("a", "U8", (10,), 0, 10),
            TensorEntry("b", "U8", (10,), 16, 10),
            TensorEntry("c", "U8", (10,), 32, 10),
        ],
        48,
    )
    # The peer holds a and c at the same distance apart, but not b: two segments, not one.
    held = VersionLayout.single(
        [TensorEntry("a", "U8", (10,), 0, 10), TensorEntry("c", "U8", (10,), 32, 10)], 48
    )
    h = Holder.from_layouts("p", dest, held)
    assert h.segments == (HeldSegment(0, 10, 0, 0), HeldSegment(32, 10, 0, 32))
    with pytest.raises(NoHolderLeft) as err:
        plan_reads(dest, [h], 1024)
    assert err.value.missing == (ByteRange(16, 26),)


def test_layout_mismatch_is_refused() -> None:
    dest = VersionLayout.single([TensorEntry("a", "BF16", (4,), 0, 8)], 8)
    with pytest.raises(LayoutMismatch, match="BF16"):
        Holder.from_layouts("p", dest, VersionLayout.single([TensorEntry("a", "F32", (2,), 0, 8)], 8))
    with pytest.raises(LayoutMismatch, match="lacks"):
        Holder.from_layouts("p", dest, VersionLayout.single([TensorEntry("z", "BF16", (4,), 0, 8)], 8))


def test_no_holder_left_when_every_holder_failed() -> None:
    total = 1000
    layout = VersionLayout.single([TensorEntry("w", "U8", (total,), 0, total)], total)
    plan = plan_reads(layout, _full(2, ["a", "b"], total), chunk_bytes=100)
    after_a = replan(plan, [ByteRange(0, 500)], "a")
    assert {t.holder for t in after_a.tasks} == {"b"}
    with pytest.raises(NoHolderLeft, match="after losing b") as err:
        replan(after_a, [ByteRange(100, 300), ByteRange(700, 800)], "b")
    assert err.value.missing == (ByteRange(100, 300), ByteRange(700, 800))
    assert "stage the version from its source" in str(err.value)


def test_replan_keeps_the_chunk_grid() -> None:
    total = 1000
    layout = VersionLayout.single([TensorEntry("w", "U8", (total,), 0, total)], total)
    plan = plan_reads(layout, _full(3, ["a", "b", "c"], total), chunk_bytes=100)
    again = replan(plan, [ByteRange(150, 420)], "b")
    assert [(t.start, t.end) for t in again.tasks] == [(150, 200), (200, 300), (300, 400), (400, 420)]
    assert {t.holder for t in again.tasks} == {"a", "c"}


def test_layout_json_round_trip_and_digest() -> None:
    layout, _ = _scenario(7)
    back = VersionLayout.from_json(layout.to_json())
    assert back == layout
    assert back.digest() == layout.digest()
    other = VersionLayout.single([TensorEntry("a", "U8", (1,), 0, 1)], 1)
    assert other.digest() != layout.digest()
    with pytest.raises(ValueError, match="malformed"):
        VersionLayout.from_json({"segments": [[0, 1]], "tensors": [["a", "U8"]]})


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        VersionLayout.single([TensorEntry("a", "U8", (8,), 0, 8), TensorEntry("b", "U8", (8,), 4, 8)], 16)
    with pytest.raises(ValueError, match="exceeds"):
        VersionLayout.single([TensorEntry("a", "U8", (8,), 4, 8)], 8)
    layout = VersionLayout.single([TensorEntry("a", "U8", (8,), 0, 8)], 8)
    with pytest.raises(ValueError, match="unique"):
        plan_reads(layout, [Holder.whole("x", 8), Holder.whole("x", 8)])
    with pytest.raises(ValueError, match="past the destination"):
        plan_reads(layout, [Holder.whole("x", 16)])
    with pytest.raises(ValueError, match="positive"):
        plan_reads(layout, [Holder.whole("x", 8)], chunk_bytes=0)
    with pytest.raises(ValueError, match="overlap"):
        Holder("x", (HeldSegment(0, 8), HeldSegment(4, 8)))
