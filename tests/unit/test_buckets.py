"""Bucket planning: exact coverage, determinism, alignment, chunking and the memory budget."""

from __future__ import annotations

import itertools
import random

import pytest
from hotswap_engine.buckets import (
    GIB,
    MIB,
    BucketPlan,
    TensorItem,
    align_up,
    assign_parts,
    choose_layout,
    layout_part,
    owners_by_part,
    plan_buckets,
)


def random_tensors(rng: random.Random, n: int, big: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1:
            size = 0
        elif kind < 0.2:
            size = rng.randint(big // 2, big * 3)  # around and above a bucket
        else:
            size = rng.randint(1, max(1, big // 8))
        out.append((f"t{i:04d}.{rng.randint(0, 10**6)}", size))
    return out


def check_plan(plan: BucketPlan, items: list[TensorItem]) -> None:
    """Every byte of every tensor exactly once, in a bucket of its owner, at aligned offsets that
    match the owner's host layout, never beyond the bucket size."""
    layouts = {p.part: {pl.name: pl for pl in p.placements} for p in plan.parts}
    covered: dict[str, list[tuple[int, int]]] = {i.name: [] for i in items}
    owner_of = {i.name: i.part for i in items}
    for index, b in enumerate(plan.buckets):
        assert b.index == index
        assert 0 <= b.nbytes <= plan.bucket_bytes
        assert b.host_offset % plan.alignment == 0
        spans = []
        for c in b.chunks:
            assert owner_of[c.name] == b.owner, "one owner per bucket"
            assert c.offset % plan.alignment == 0
            assert c.offset + c.nbytes <= b.nbytes
            # the slot offset is the host offset minus the bucket start: one copy moves the bucket
            assert b.host_offset + c.offset == layouts[b.owner][c.name].offset + c.tensor_offset
            assert c.tensor_nbytes == layouts[b.owner][c.name].nbytes
            covered[c.name].append((c.tensor_offset, c.nbytes))
            spans.append((c.offset, c.offset + c.nbytes))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "chunks in a bucket overlap"
        if b.chunks:
            assert b.nbytes == max(end for _, end in spans)
    sizes = {i.name: i.nbytes for i in items}
    for name, parts in covered.items():
        assert parts, f"{name} is in no bucket"
        parts.sort()
        cursor = 0
        for start, n in parts:
            assert start == cursor, f"{name}: gap or overlap at {cursor}"
            cursor += n
        assert cursor == sizes[name]
        if sizes[name] <= plan.bucket_bytes:
            assert len(parts) == 1, f"{name} fits a bucket but was split"
    assert plan.total_bytes >= sum(sizes.values())


def test_align_up() -> None:
    assert [align_up(v, 256) for v in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    with pytest.raises(ValueError):
        align_up(3, 0)


def test_assign_parts_balanced_and_order_independent() -> None:
    rng = random.Random(7)
    for trial in range(200):
        tensors = random_tensors(rng, rng.randint(1, 60), 1 << 20)
        count = rng.randint(1, 5)
        a = assign_parts(tensors, count)
        shuffled = tensors[:]
        rng.shuffle(shuffled)
        assert assign_parts(shuffled, count) == a, f"trial {trial}: depends on input order"
        assert set(a) == {n for n, _ in tensors}
        assert set(a.values()) <= set(range(count))
        loads = [0] * count
        for name, size in tensors:
            loads[a[name]] += size
        largest = max(size for _, size in tensors)
        assert max(loads) - sum(loads) / count <= largest, f"trial {trial}: unbalanced {loads}"


def test_assign_parts_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        assign_parts([("a", 1)], 0)
    with pytest.raises(ValueError, match="twice"):
        assign_parts([("a", 1), ("a", 2)], 2)
    with pytest.raises(ValueError, match="negative"):
        assign_parts([("a", -1)], 1)


def test_layout_part_is_by_name_and_aligned() -> None:
    items = [TensorItem("b", 10, 0), TensorItem("a", 300, 0), TensorItem("c", 5, 1)]
    layout = layout_part(items, 0, 256)
    assert [(p.name, p.offset, p.nbytes) for p in layout.placements] == [("a", 0, 300), ("b", 512, 10)]
    assert layout.nbytes == 768
    assert layout_part(items, 2, 256).nbytes == 0


def test_plan_small_example() -> None:
    items = [TensorItem("a", 100, 0), TensorItem("b", 100, 0), TensorItem("c", 1000, 1)]
    plan = plan_buckets(items, 512, 256)
    check_plan(plan, items)
    # c (1000 bytes) is chunked 512 + 488; the owners interleave by position in their buffers.
    assert [(b.owner, b.host_offset, b.nbytes) for b in plan.buckets] == [
        (0, 0, 356),
        (1, 0, 512),
        (1, 512, 488),
    ]
    assert [c.name for c in plan.buckets[0].chunks] == ["a", "b"]
    assert plan.largest_chunked_tensor == 1000


def test_plan_random_sets() -> None:
    rng = random.Random(1234)
    for trial in range(300):
        alignment = rng.choice([1, 64, 256, 4096])
        bucket = alignment * rng.randint(1, 64)
        tensors = random_tensors(rng, rng.randint(0, 50), bucket)
        count = rng.randint(1, 4)
        parts = assign_parts(tensors, count)
        items = [TensorItem(n, s, parts[n]) for n, s in tensors]
        plan = plan_buckets(items, bucket, alignment)
        check_plan(plan, items)
        again = plan_buckets(list(reversed(items)), bucket, alignment)
        assert again == plan, f"trial {trial}: plan depends on input order"


def test_plan_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        plan_buckets([TensorItem("a", 1)], 300, 256)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([TensorItem("a", 1), TensorItem("a", 1, 1)], 256, 256)


def test_choose_layout_within_budget() -> None:
    rng = random.Random(99)
    for _ in range(300):
        budget = rng.randint(200 * MIB, 8 * GIB)
        largest = rng.randint(0, 2 * GIB)
        total = rng.randint(largest, 40 * GIB)
        try:
            layout = choose_layout(budget, largest, total)
        except ValueError as e:
            assert "too small" in str(e)
            assert largest + 2 * MIB + 64 * MIB > budget
            continue
        assert layout.gpu_bytes + 64 * MIB <= budget
        assert layout.slots >= 2
        assert layout.bucket_bytes % 256 == 0
        assert layout.reassembly_bytes == (largest if largest > layout.bucket_bytes else 0)


def test_choose_layout_defaults() -> None:
    # 2 GiB default budget, Qwen3-8B: the embedding (1.16 GiB) is chunked and rebuilt on the receiver.
    embed = 151936 * 4096 * 2
    layout = choose_layout(2 * GIB, embed, 16 * GIB)
    assert (layout.bucket_bytes, layout.slots) == (128 * MIB, 4)
    assert layout.gpu_bytes <= 2 * GIB
    # Without reassembly (receivers copy chunk by chunk into their parameters) 4 × 256 MiB fits.
    assert choose_layout(2 * GIB, embed, 16 * GIB, reassemble=False).bucket_bytes == 256 * MIB
    # A tiny update does not get 256 MiB slots.
    assert choose_layout(2 * GIB, 1000, 5000).bucket_bytes == 1 * MIB
    with pytest.raises(ValueError, match="too small"):
        choose_layout(100 * MIB, 200 * MIB)


def test_owners_by_part() -> None:
    assert owners_by_part({0: (0, 2), 1: (1, 2), 2: (0, 2)}, 2) == {0: 0, 1: 1}
    assert owners_by_part({0: None, 1: (1, 2)}, 2) == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="no member holds part 1"):
        owners_by_part({0: (0, 2)}, 2)
    with pytest.raises(ValueError, match="plan has 2"):
        owners_by_part({0: (0, 3)}, 2)
