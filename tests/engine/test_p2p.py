"""Peer-to-peer catch-up over real Mooncake TCP on loopback.

Holders are separate processes (multiprocessing spawn), each publishing a staged version with known
content through `P2PEndpoint.publish`; the reader in the test process plans and pulls. Holders are
killed (SIGKILL) or frozen (SIGSTOP) mid-pull to check the resume path. Messages between the test and
its holders are JSON (`send_bytes`), never pickled objects.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch
from hotswap_api.protocol import TensorSpec
from hotswap_engine import buckets
from hotswap_engine.hostmem import HostBuffer
from hotswap_engine.p2p_plan import NoHolderLeft, plan_reads
from hotswap_engine.staging import StagedCheckpoint, tensor_nbytes
from hotswap_engine.transport.p2p import P2PEndpoint, P2PError, PeerSource, staged_layout

HOST = "127.0.0.1"
VERSION = "v2"
MIB = 1 << 20


def _specs() -> list[TensorSpec]:
    """A small model-shaped checkpoint (~24 MiB): a few large matrices, many small vectors."""
    specs = [TensorSpec(name="embed.weight", dtype="BF16", shape=(4096, 512))]
    for layer in range(6):
        specs += [
            TensorSpec(name=f"layers.{layer}.mlp.weight", dtype="BF16", shape=(1024, 1024)),
            TensorSpec(name=f"layers.{layer}.attn.weight", dtype="F32", shape=(256, 300)),
            TensorSpec(name=f"layers.{layer}.norm.weight", dtype="F32", shape=(517,)),
            TensorSpec(name=f"layers.{layer}.bias", dtype="BF16", shape=(3,)),
        ]
    return specs


def _content(name: str, nbytes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def _staged(parts: list[int], count: int, fill: bool) -> StagedCheckpoint:
    """A staged checkpoint holding `parts` of `count` (as staging or a broadcast leaves it)."""
    specs = _specs()
    assignment = buckets.assign_parts(((s.name, tensor_nbytes(s.dtype, s.shape)) for s in specs), count)
    items = [buckets.TensorItem(s.name, tensor_nbytes(s.dtype, s.shape), assignment[s.name]) for s in specs]
    segments = {p: HostBuffer(buckets.layout_part(items, p).nbytes, pinned=False) for p in parts}
    staged = StagedCheckpoint(specs, assignment, count, segments)
    for seg in segments.values():
        seg.tensor.fill_(0xEE)  # padding junk: never compared, but visible if misplaced
    if fill:
        for name, t in staged.tensors.items():
            staged.raw(name).copy_(_content(name, t.nbytes))
    return staged


def _holder_main(conn: Connection, parts: list[int], count: int) -> None:
    """A holder: stage its parts, publish them, then serve reads without doing anything itself."""
    staged = _staged(parts, count, fill=True)
    endpoint = P2PEndpoint(HOST, protocol="tcp")
    source = endpoint.publish(VERSION, staged.segments, staged_layout(staged))
    conn.send_bytes(json.dumps(source.to_dict()).encode())
    while True:
        command = json.loads(conn.recv_bytes())
        if command == "withdraw":
            endpoint.withdraw(VERSION)
            conn.send_bytes(b'"ok"')
        elif command == "exit":
            endpoint.close()
            return


@dataclass
class HolderProc:
    name: str
    proc: Any
    conn: Connection
    source: PeerSource


@pytest.fixture
def spawn_holders() -> Iterator[Any]:
    procs: list[HolderProc] = []
    ctx = mp.get_context("spawn")

    def spawn(*layouts: tuple[list[int], int]) -> list[HolderProc]:
        started = []
        for parts, count in layouts:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_holder_main, args=(child, parts, count), daemon=True)
            proc.start()
            started.append((proc, parent))
        for i, (proc, parent) in enumerate(started):
            assert parent.poll(120), "holder did not start"
            source = PeerSource.from_dict(json.loads(parent.recv_bytes()))
            procs.append(HolderProc(f"holder-{len(procs)}", proc, parent, source))
            del i
        return procs[-len(layouts) :]

    yield spawn
    for h in procs:
        if h.proc.is_alive():
            os.kill(h.proc.pid, signal.SIGKILL)
        h.proc.join(10)


@pytest.fixture(scope="module")
def reader() -> Iterator[P2PEndpoint]:
    with P2PEndpoint(HOST, protocol="tcp") as endpoint:
        yield endpoint


def _plan(reader: P2PEndpoint, holders: list[HolderProc], chunk: int) -> tuple[Any, StagedCheckpoint]:
    dest = _staged([0], 1, fill=False)
    layout = staged_layout(dest)
    hs, errors = reader.holders({h.name: h.source for h in holders}, layout)
    assert errors == {}
    return plan_reads(layout, hs, chunk), dest


def _assert_exact(dest: StagedCheckpoint) -> None:
    assert dest.complete
    for name, t in dest.tensors.items():
        assert torch.equal(dest.raw(name), _content(name, t.nbytes)), name


def test_pull_from_three_holders_is_byte_exact(spawn_holders: Any, reader: P2PEndpoint) -> None:
    # one complete copy laid out like the reader's, one complete over 2 part buffers (what a
    # broadcast leaves), one holding only part 1 of 3
    holders = spawn_holders(([0], 1), ([0, 1], 2), ([1], 3))
    assert all(h.source.endpoint.startswith(f"{HOST}:") for h in holders)
    plan, dest = _plan(reader, holders, chunk=2 * MIB)
    seen: list[int] = []
    result = reader.pull(
        plan,
        dest.segments[0],
        {h.name: h.source for h in holders},
        progress=lambda done, total: seen.append(done),
    )
    _assert_exact(dest)
    assert result.bytes == plan.total_bytes >= dest.nbytes
    assert seen[-1] == plan.total_bytes and seen == sorted(seen)
    assert result.failed_holders == ()
    assert all(result.bytes_by_holder.get(h.name, 0) > 0 for h in holders), result.bytes_by_holder


def test_killing_a_holder_mid_pull_still_ends_byte_exact(spawn_holders: Any, reader: P2PEndpoint) -> None:
    holders = spawn_holders(([0], 1), ([0, 1], 2), ([0], 1))
    victim = holders[0]
    plan, dest = _plan(reader, holders, chunk=512 << 10)
    assert len(plan.tasks_by_holder()[victim.name]) > 8

    def kill_at_a_third(done: int, total: int) -> None:
        if done > total // 3 and victim.proc.is_alive():
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.join(10)

    result = reader.pull(
        plan, dest.segments[0], {h.name: h.source for h in holders}, progress=kill_at_a_third
    )
    assert not victim.proc.is_alive()
    _assert_exact(dest)
    assert result.failed_holders == (victim.name,)
    assert result.replans >= 1
    assert result.bytes_by_holder.get(victim.name, 0) < plan.bytes_by_holder()[victim.name]


def test_killing_every_holder_raises_no_holder_left_quickly(spawn_holders: Any, reader: P2PEndpoint) -> None:
    holders = spawn_holders(([0], 1), ([0, 1], 2))
    plan, dest = _plan(reader, holders, chunk=512 << 10)

    def kill_all(done: int, total: int) -> None:
        if done > total // 4:
            for h in holders:
                if h.proc.is_alive():
                    os.kill(h.proc.pid, signal.SIGKILL)
                    h.proc.join(10)

    started = time.monotonic()
    with pytest.raises(NoHolderLeft) as err:
        reader.pull(plan, dest.segments[0], {h.name: h.source for h in holders}, progress=kill_all)
    assert time.monotonic() - started < 30
    assert err.value.missing
    assert set(err.value.failed) == {h.name for h in holders}
    assert "stage the version from its source" in str(err.value)


def test_a_frozen_holder_times_out_and_its_reads_move(spawn_holders: Any, reader: P2PEndpoint) -> None:
    holders = spawn_holders(([0], 1), ([0], 1))
    frozen = holders[1]
    plan, dest = _plan(reader, holders, chunk=512 << 10)
    froze = threading.Event()

    def freeze(done: int, total: int) -> None:
        if done > total // 4 and not froze.is_set():
            os.kill(frozen.proc.pid, signal.SIGSTOP)
            froze.set()

    try:
        result = reader.pull(
            plan,
            dest.segments[0],
            {h.name: h.source for h in holders},
            progress=freeze,
            stall_timeout_s=1.0,
            min_rate=1 << 30,
        )
    finally:
        os.kill(frozen.proc.pid, signal.SIGKILL)
    _assert_exact(dest)
    assert result.failed_holders == (frozen.name,)


def test_peer_source_round_trips_through_json() -> None:
    source = PeerSource.from_dict(
        {
            "endpoint": "127.0.0.1:1234",
            "version": "v2",
            "buffers": [{"segment": 0, "address": 1 << 40, "nbytes": 10}],
            "layout_address": 5,
            "layout_nbytes": 6,
            "layout_sha256": "ab",
        }
    )
    assert PeerSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    with pytest.raises(ValueError, match="malformed"):
        PeerSource.from_dict({"endpoint": "x"})


def test_layout_is_checked_and_a_withdrawn_version_is_no_longer_served(
    spawn_holders: Any, reader: P2PEndpoint
) -> None:
    (holder,) = spawn_holders(([0], 1))
    layout = reader.fetch_layout(holder.source)
    assert len(layout.tensors) == len(_specs())
    forged = PeerSource.from_dict({**holder.source.to_dict(), "layout_sha256": "0" * 64})
    with pytest.raises(P2PError, match="sha256"):
        reader.fetch_layout(forged)
    plan, dest = _plan(reader, [holder], chunk=4 * MIB)
    holder.conn.send_bytes(b'"withdraw"')
    assert json.loads(holder.conn.recv_bytes()) == "ok"
    with pytest.raises(NoHolderLeft):
        reader.pull(plan, dest.segments[0], {holder.name: holder.source})
    with pytest.raises(P2PError, match="layout"):
        reader.fetch_layout(holder.source)


def test_a_peer_that_never_answers_is_left_out_in_bounded_time(
    spawn_holders: Any, reader: P2PEndpoint
) -> None:
    good, frozen = spawn_holders(([0], 1), ([0], 1))
    os.kill(frozen.proc.pid, signal.SIGSTOP)  # accepts connections, never answers the handshake
    try:
        dest = _staged([0], 1, fill=False)
        layout = staged_layout(dest)
        started = time.monotonic()
        sources = {frozen.name: frozen.source, good.name: good.source}
        holders, errors = reader.holders(sources, layout, timeout_s=2)
        assert [h.name for h in holders] == [good.name]
        assert "did not answer" in errors[frozen.name]
        # The frozen peer must not stall the engine for the others (Mooncake's handshake would, for
        # a minute, had it been contacted through the transfer path).
        reader.pull(plan_reads(layout, holders, 4 * MIB), dest.segments[0], {good.name: good.source})
        assert time.monotonic() - started < 20
        _assert_exact(dest)
    finally:
        os.kill(frozen.proc.pid, signal.SIGKILL)
