"""Rank workers: the global rank layout, the split of a pod's part among its local ranks, the
agent↔worker message encoding (msgpack frames with fds), and the hand-off endpoint per rank."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter

import pytest
from hotswap_engine import buckets
from hotswap_engine.agent import ranks
from hotswap_engine.agent.settings import rank_endpoint


def test_global_ranks_are_pod_major() -> None:
    layouts = [ranks.RankLayout(p, 3, 2) for p in range(3)]
    assert [lay.global_rank(lr) for lay in layouts for lr in range(2)] == list(range(6))
    assert layouts[0].world_size == 6
    assert layouts[2].pod_of(5) == 2 and layouts[0].pod_of(1) == 0
    assert ranks.member_names(("a", "b"), 2) == ("a/0", "a/1", "b/0", "b/1")
    with pytest.raises(ValueError):
        layouts[0].global_rank(2)
    with pytest.raises(ValueError):
        ranks.RankLayout(3, 3, 1)


def _plan(parts: int, sizes: list[int], bucket: int = 1000) -> buckets.BucketPlan:
    named = [(f"t{i:02d}", n) for i, n in enumerate(sizes)]
    assignment = buckets.assign_parts(named, parts)
    items = [buckets.TensorItem(name, n, assignment[name]) for name, n in named]
    return buckets.plan_buckets(items, bucket, 8)


@pytest.mark.parametrize("local", [1, 2, 3])
def test_split_deals_each_parts_buckets_to_the_holding_pods_local_ranks(local: int) -> None:
    plan = _plan(2, [3000, 2500, 700, 400, 4100, 90, 1200, 0])
    split = ranks.split_plan(plan, {0: (0, 2), 1: (1, 2)}, local)
    assert len(split.plan.parts) == 2 * local
    # Same buckets, bytes and chunks: only owners renamed.
    assert [(b.index, b.host_offset, b.nbytes, b.chunks) for b in split.plan.buckets] == [
        (b.index, b.host_offset, b.nbytes, b.chunks) for b in plan.buckets
    ]
    for vb, b in zip(split.plan.buckets, plan.buckets, strict=True):
        assert split.real_part[vb.owner] == b.owner
        pod = b.owner  # pod p holds part p
        assert split.owners[vb.owner] == pod * local + split.local_rank_of(vb.owner)
    # Every local rank of a pod moves a fair share of that pod's buckets (round robin).
    for part in range(2):
        per_rank = Counter(
            vb.owner % local
            for vb, b in zip(split.plan.buckets, plan.buckets, strict=True)
            if b.owner == part
        )
        assert max(per_rank.values()) - min(per_rank.values(), default=0) <= 1
        assert len(per_rank) == min(local, sum(1 for b in plan.buckets if b.owner == part))
    # parts_of covers every virtual part exactly once.
    assert sorted(v for lr in range(local) for v in split.parts_of(lr)) == sorted(split.real_part)


def test_split_with_a_complete_holder_uses_its_local_ranks() -> None:
    plan = _plan(1, [5000, 3000])
    split = ranks.split_plan(plan, {0: None}, 2)  # a pod re-applying a complete version alone
    assert {split.owners[b.owner] for b in split.plan.buckets} == {0, 1}
    split = ranks.split_plan(_plan(2, [5000, 3000, 100]), {0: None, 1: (1, 2)}, 2)
    # part 1 is broadcast by pod 1 (global ranks 2, 3), part 0 by the complete pod 0 (ranks 0, 1)
    assert {v: r // 2 for v, r in split.owners.items()} == {0: 0, 1: 0, 2: 1, 3: 1}


def test_split_refuses_a_part_count_that_does_not_match() -> None:
    with pytest.raises(ValueError, match="parts"):
        ranks.split_plan(_plan(2, [10, 20]), {0: (0, 3), 1: (1, 3)}, 2)


def test_messages_round_trip_with_fds() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        msg = {"op": "map", "buffers": [{"id": 1, "nbytes": 4096, "capacity": 8192}]}
        ranks.send_message(a, msg, [r])
        got, fds = ranks.recv_message(b)
        assert got == {"op": "map", "buffers": ({"id": 1, "nbytes": 4096, "capacity": 8192},)}
        assert len(fds) == 1
        wire = ranks.parts_to_wire({0: (0, 2), 1: None})
        assert ranks.parts_from_wire(wire) == {0: (0, 2), 1: None}
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe, through SCM_RIGHTS
        os.close(fds[0])
        big = {"op": "result", "ok": False, "error": "x" * (3 << 20)}  # longer than one recv
        # More than the socket buffer holds: the sender blocks until the reader drains it.
        sender = threading.Thread(target=ranks.send_message, args=(a, big))
        sender.start()
        got, fds = ranks.recv_message(b)
        assert (got["op"], got["ok"], got["error"], fds) == ("result", False, big["error"], [])
        sender.join(10)
        a.close()
        with pytest.raises(EOFError):
            ranks.recv_message(b)
    finally:
        b.close()
        os.close(r)
        os.close(w)


def test_bad_messages_are_refused() -> None:
    with pytest.raises(ranks.ProtocolError):
        ranks.decode(b"\xc1")  # never valid msgpack
    with pytest.raises(ranks.ProtocolError):
        ranks.decode(ranks.encode({"x": 1})[4:])  # no op
    with pytest.raises(ranks.ProtocolError):
        ranks.frame_length(ranks.FRAME_HEADER.pack(ranks.MAX_FRAME_BYTES + 1))
    with pytest.raises(ranks.ProtocolError):
        ranks.parts_from_wire([[1, 2, 3]])
    with pytest.raises(ValueError):
        ranks.parts_to_wire({1: None})


def test_rank_endpoints() -> None:
    assert rank_endpoint("ipc:///run/hotswap/handoff.sock", 1) == "ipc:///run/hotswap/handoff.sock"
    assert rank_endpoint("ipc:///run/hotswap/handoff.sock", 2) == "ipc:///run/hotswap/handoff-{rank}.sock"
    assert rank_endpoint("ipc:///run/h/x", 2) == "ipc:///run/h/x-{rank}"
    assert rank_endpoint("ipc:///run/h.d/x", 2) == "ipc:///run/h.d/x-{rank}"
    assert rank_endpoint("tcp://127.0.0.1:5{rank}00", 2) == "tcp://127.0.0.1:5{rank}00"
    with pytest.raises(ValueError):
        rank_endpoint("tcp://127.0.0.1:0", 2)


def test_host_buffers_map_in_another_process_through_their_fd() -> None:
    from hotswap_engine.hostmem import HostBuffer

    src = HostBuffer(10000, pinned=False)
    src.tensor[:5] = 7
    dup = HostBuffer.from_fd(os.dup(src.share_fd()), 10000, src.capacity)
    assert dup.tensor[:5].tolist() == [7] * 5
    dup.tensor[9999] = 3
    assert int(src.tensor[9999]) == 3  # the same pages
    dup.close()
    assert dup.freed and not src.freed
    src.close()
    assert src.freed


def test_a_worker_holding_another_nccl_membership_is_replaced_not_torn_down() -> None:
    """The decision behind the `prepare` command: only a healthy NCCL group of another membership
    makes a rank worker ask to be replaced (gloo groups are torn down in-process; a broken one has
    made its worker exit already; the same membership is reused)."""
    import torch
    from hotswap_engine.transport.process_group import GroupCache, GroupSpec

    cpu = torch.device("cpu")
    old = GroupSpec(("a/0", "b/0"), "127.0.0.1", 29500, "nccl")
    new = GroupSpec(("a/0", "b/0", "c/0"), "127.0.0.1", 29500, "nccl")

    class Held:  # what GroupCache keeps of a formed group (forming a real NCCL one needs GPUs)
        def __init__(self, spec: GroupSpec) -> None:
            self.spec, self.broken = spec, False

    cache = GroupCache()
    assert not cache.would_abandon(new, 0, bind_host="127.0.0.1", device=cpu)  # nothing held
    held = Held(old)
    cache._group, cache._key = held, (old, 0, "127.0.0.1", cpu)  # type: ignore[assignment]
    assert not cache.would_abandon(old, 0, bind_host="127.0.0.1", device=cpu)  # same: reused
    assert cache.would_abandon(new, 0, bind_host="127.0.0.1", device=cpu)  # new members
    assert cache.would_abandon(old, 1, bind_host="127.0.0.1", device=cpu)  # another rank
    held.broken = True
    assert not cache.would_abandon(new, 0, bind_host="127.0.0.1", device=cpu)
    gloo = GroupSpec(old.members, old.master_addr, old.master_port, "gloo")
    cache._group, cache._key = Held(gloo), (gloo, 0, "127.0.0.1", cpu)  # type: ignore[assignment]
    assert not cache.would_abandon(new, 0, bind_host="127.0.0.1", device=cpu)
