"""Hand-off over shared memory: real ZeroMQ sockets, receivers in spawned processes where the
behaviour under test crosses a process boundary (bytes, death), in-process where it is protocol."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hotswap_engine.handoff import (
    Entry,
    HandoffAborted,
    HandoffError,
    HandoffPeerLost,
    HandoffReceiver,
    HandoffRemoteError,
    HandoffSender,
    HandoffTimeout,
    SharedMemorySlot,
    create_slots,
)
from hotswap_testing.handoff_push import pack_naive, push_tensors, send_bucket, tensor_bytes
from hotswap_testing.handoff_selftest import digests, make_tensors, receiver_main, sender_die_main
from hotswap_testing.waiting import wait_for

CPU = torch.device("cpu")
SPAWN = mp.get_context("spawn")


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    # A per-test folder instead of /dev/shm keeps tests from leaving files behind; tmpfs or not,
    # both processes map the same file.
    d = tmp_path / "shm"
    d.mkdir()
    return d


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/handoff.sock"


def spawn_receiver(endpoint: str, result: Path, **kwargs: Any) -> Any:
    proc = SPAWN.Process(target=receiver_main, args=(endpoint, str(result)), kwargs=kwargs)
    proc.start()
    return proc


def read_result(proc: Any, result: Path) -> dict[str, Any]:
    proc.join(60)
    assert proc.exitcode == 0
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def test_pack_naive_covers_every_byte_once() -> None:
    tensors = make_tensors(1)
    buckets = pack_naive(tensors, 4096, alignment=64)
    seen: dict[str, list[tuple[int, int]]] = {}
    for bucket in buckets:
        ends = [e.offset + e.nbytes for e, _ in bucket]
        assert max(ends) <= 4096
        for e, src in bucket:
            assert e.offset % 64 == 0 and src.numel() == e.nbytes
            seen.setdefault(e.name, []).append((e.tensor_offset, e.nbytes))
    for name, t in tensors:
        chunks = seen[name]
        assert [o for o, _ in chunks] == sorted(o for o, _ in chunks)
        assert sum(n for _, n in chunks) == tensor_bytes(t).numel()
    assert len(seen["big.weight"]) > 1  # chunked


@pytest.mark.parametrize("mode", ["weights", "slices"])
def test_bytes_arrive_exactly_in_another_process(
    mode: str, shm_dir: Path, endpoint: str, tmp_path: Path
) -> None:
    tensors = make_tensors(3)
    result = tmp_path / "result.json"
    proc = spawn_receiver(endpoint, result, mode=mode, seed=3)
    slots = create_slots(2, 16 << 10, CPU, shm_dir)
    with HandoffSender(endpoint, 1, timeout=60) as sender:
        buckets = push_tensors(sender, "v1", slots, tensors)
    out = read_result(proc, result)
    assert out["ok"], out
    assert out["version"] == "v1"
    assert out["digests"] == digests(tensors)
    assert buckets > 2 * len(slots)  # slots were reused


def test_slot_reuse_waits_for_a_slow_receiver(shm_dir: Path, tmp_path: Path) -> None:
    # tcp on loopback, a random port, one slot smaller than the big tensor: every bucket must wait for
    # the previous one's ack; an early overwrite would change the digests.
    tensors = make_tensors(4)
    result = tmp_path / "result.json"
    with HandoffSender("tcp://127.0.0.1:0", 1, timeout=60) as sender:
        proc = spawn_receiver(sender.endpoint, result, mode="weights", delay_s=0.02, seed=4)
        slots = create_slots(1, 8 << 10, CPU, shm_dir)
        push_tensors(sender, "v2", slots, tensors)
    out = read_result(proc, result)
    assert out["ok"], out
    assert out["digests"] == digests(tensors)


def test_two_workers_share_the_slots_and_both_must_ack(shm_dir: Path, endpoint: str, tmp_path: Path) -> None:
    tensors = make_tensors(5)
    results = [tmp_path / f"r{i}.json" for i in range(2)]
    procs = [spawn_receiver(endpoint, results[i], rank=i, delay_s=0.01 * i, seed=5) for i in range(2)]
    slots = create_slots(2, 8 << 10, CPU, shm_dir)
    with HandoffSender(endpoint, 2, timeout=60) as sender:
        push_tensors(sender, "tp", slots, tensors)
    for proc, result in zip(procs, results, strict=True):
        out = read_result(proc, result)
        assert out["ok"], out
        assert out["digests"] == digests(tensors)


def test_abort_raises_in_the_receiver(shm_dir: Path, endpoint: str, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    proc = spawn_receiver(endpoint, result)
    slots = create_slots(2, 8 << 10, CPU, shm_dir)
    buckets = pack_naive(make_tensors(0), 8 << 10)
    with HandoffSender(endpoint, 1, timeout=60) as sender:
        sender.begin("v-abort", slots)
        for i in range(2):
            sender.wait_slot_free(i % 2)
            send_bucket(sender, slots[i % 2], i % 2, buckets[i])
        sender.abort("trainer cancelled the update")
    out = read_result(proc, result)
    assert not out["ok"]
    assert out["error_type"] == "HandoffAborted"
    assert "trainer cancelled the update" in out["error"]


def test_dead_receiver_fails_the_sender_quickly(shm_dir: Path, endpoint: str, tmp_path: Path) -> None:
    proc = spawn_receiver(endpoint, tmp_path / "result.json", delay_s=5.0)
    slots = create_slots(2, 8 << 10, CPU, shm_dir)
    buckets = pack_naive(make_tensors(0), 8 << 10)
    with HandoffSender(endpoint, 1, timeout=60) as sender:
        sender.begin("v-dead", slots)
        send_bucket(sender, slots[0], 0, buckets[0])
        proc.kill()
        start = time.monotonic()
        with pytest.raises(HandoffPeerLost):
            sender.wait_slot_free(0)
        # the connection loss is seen, not the 60 s timeout
        assert time.monotonic() - start < 10
    proc.join(10)


def test_dead_sender_fails_the_receiver_quickly(shm_dir: Path, endpoint: str) -> None:
    proc = SPAWN.Process(target=sender_die_main, args=(endpoint, str(shm_dir)))
    proc.start()
    with HandoffReceiver(endpoint, 0, timeout=60) as rx:
        assert rx.wait_begin() == "v-dying"
        start = time.monotonic()
        got = []
        with pytest.raises(HandoffPeerLost):
            for name, _ in rx.weights():
                got.append(name)
        assert got  # the first bucket arrived before the sender died
        assert time.monotonic() - start < 30
    proc.join(10)


# -- protocol behaviour, single process ---------------------------------------------------------


@pytest.fixture
def pair(
    shm_dir: Path, endpoint: str
) -> Iterator[tuple[HandoffSender, HandoffReceiver, list[SharedMemorySlot]]]:
    slots = [SharedMemorySlot.create(4096, shm_dir) for _ in range(2)]
    sender = HandoffSender(endpoint, 1, timeout=5)
    rx = HandoffReceiver(endpoint, 0, timeout=5)
    yield sender, rx, slots
    rx.close()
    sender.close()
    for s in slots:
        s.close()


def _entry(name: str, offset: int = 0) -> Entry:
    return Entry(name, "F32", (4,), offset, 16)


def test_busy_slot_is_refused_and_waiting_times_out(
    pair: tuple[HandoffSender, HandoffReceiver, list[SharedMemorySlot]],
) -> None:
    sender, rx, slots = pair
    sender.begin("v", slots)
    slots[0].tensor[:16].copy_(tensor_bytes(torch.arange(4, dtype=torch.float32)))
    sender.send_bucket(0, [_entry("a")])
    with pytest.raises(HandoffError, match="still holds bucket 0"):
        sender.send_bucket(0, [_entry("b")])
    with pytest.raises(HandoffTimeout, match="did not acknowledge bucket 0"):
        sender.wait_slot_free(0, timeout=0.3)
    it = rx.weights()
    name, t = next(it)  # the receiver copies the bucket out and acks it before yielding
    assert name == "a" and t.tolist() == [0.0, 1.0, 2.0, 3.0]
    sender.wait_slot_free(0, timeout=5)
    slots[0].tensor[:16].fill_(0)  # the sender may now overwrite: the receiver holds its own copy
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    sender.send_bucket(0, [_entry("b")])
    assert next(it)[0] == "b"


def test_receiver_error_reaches_the_sender(
    pair: tuple[HandoffSender, HandoffReceiver, list[SharedMemorySlot]],
) -> None:
    sender, rx, slots = pair
    sender.begin("v", slots)
    sender.send_bucket(0, [_entry("a")])
    rx.wait_begin()
    rx.fail("load_weights: no parameter named a")
    with pytest.raises(HandoffRemoteError, match="rank 0: load_weights: no parameter named a"):
        sender.wait_slot_free(0)
    sender.abort("worker failed")
    with pytest.raises(HandoffAborted):
        list(rx.weights())


def test_silent_sender_times_out_the_receiver(
    pair: tuple[HandoffSender, HandoffReceiver, list[SharedMemorySlot]],
) -> None:
    sender, rx, slots = pair
    sender.begin("v", slots)
    rx.timeout = 0.5
    start = time.monotonic()
    with pytest.raises(HandoffTimeout, match="session v"):
        list(rx.weights())
    assert time.monotonic() - start < 3


def test_missing_worker_times_out_begin(shm_dir: Path, endpoint: str) -> None:
    slots = [SharedMemorySlot.create(4096, shm_dir)]
    with (
        HandoffSender(endpoint, 2, timeout=0.5) as sender,
        HandoffReceiver(endpoint, 0),
        pytest.raises(HandoffTimeout, match="only 1 of 2"),
    ):
        sender.begin("v", slots)
    slots[0].close()


def test_sender_serves_several_sessions(shm_dir: Path, endpoint: str) -> None:
    # One sender for the agent's lifetime, a new receiver per update (as vLLM workers connect per apply).
    slots = [SharedMemorySlot.create(4096, shm_dir)]

    def receive(out: list[tuple[str, list[float]]]) -> None:
        with HandoffReceiver(endpoint, 0, timeout=10) as rx:
            out.extend((name, t.tolist()) for name, t in rx.weights())
            rx.done()

    with HandoffSender(endpoint, 1, timeout=10) as sender:
        for value in (1.0, 2.0, 3.0):
            got: list[tuple[str, list[float]]] = []
            thread = threading.Thread(target=receive, args=(got,))
            thread.start()
            push_tensors(sender, f"v{value:.0f}", slots, [("w", torch.full((4,), value))])
            thread.join(10)
            assert got == [("w", [value] * 4)]
    slots[0].close()


def test_stale_hello_of_a_gone_worker_is_skipped(shm_dir: Path, endpoint: str) -> None:
    # A worker of an earlier update said hello and gave up before any begin (the agent failed
    # before sending). The next update's begin must reach the current worker of that rank.
    slots = [SharedMemorySlot.create(4096, shm_dir)]
    got: list[str] = []
    dropped = threading.Event()

    class Dropped(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "dropping the stale hand-off hello" in record.getMessage():
                dropped.set()

    def receive() -> None:
        # Connect only once begin() dropped the stale hello: connecting earlier would replace it
        # (the latest hello of a rank wins) and the stale path would go untested.
        assert dropped.wait(10), "begin() did not drop the stale hello"
        with HandoffReceiver(endpoint, 0, timeout=10) as rx:
            got.extend(name for name, _ in rx.weights())
            rx.done()

    sender_log = logging.getLogger("hotswap_engine.handoff.sender")
    handler = Dropped()
    sender_log.addHandler(handler)
    level = sender_log.level
    sender_log.setLevel(logging.INFO)
    try:
        with HandoffSender(endpoint, 1, timeout=10) as sender:
            with HandoffReceiver(endpoint, 0):
                sender.wait_workers()
                wait_for(lambda: sender.connections() == 1, 10, "the sender seeing the first worker connect")
            # Its connection is closed now (the sender saw it go); its hello is still queued.
            wait_for(lambda: sender.connections() == 0, 10, "the sender seeing the first worker disconnect")
            thread = threading.Thread(target=receive)
            thread.start()
            push_tensors(sender, "v", slots, [("w", torch.ones(4))])
            thread.join(10)
    finally:
        sender_log.removeHandler(handler)
        sender_log.setLevel(level)
    assert got == ["w"]
    slots[0].close()


def test_chunk_out_of_order_is_a_protocol_error(
    pair: tuple[HandoffSender, HandoffReceiver, list[SharedMemorySlot]],
) -> None:
    sender, rx, slots = pair
    sender.begin("v", slots)
    sender.send_bucket(0, [Entry("w", "F32", (8,), 0, 16, tensor_offset=16, tensor_nbytes=32)])
    with pytest.raises(HandoffError, match="first chunk at offset 16"):
        list(rx.weights())


CREATE_SLOTS = """
import sys, torch
from hotswap_engine.handoff import create_slots
slots = create_slots(2, 4096, torch.device("cpu"), sys.argv[1])
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills it)
"""


def test_slots_of_a_killed_creator_are_removed_by_the_next_one(shm_dir: Path) -> None:
    """A rank worker SIGKILLed mid-update never unlinks its slot files (RAM in the pod's emptyDir);
    the next `create_slots` there removes them, and leaves a live creator's alone."""

    def creator() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", CREATE_SLOTS, str(shm_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    dead, live = creator(), creator()
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(30)

        def of(pid: int) -> set[str]:
            return {f.name for f in shm_dir.glob(f"hotswap-slot-{pid}-*")}

        assert len(of(dead.pid)) == 2 and len(of(live.pid)) == 2
        mine = create_slots(1, 4096, torch.device("cpu"), shm_dir)
        assert of(dead.pid) == set(), "the killed creator's slots are still there"
        assert len(of(live.pid)) == 2 and len(of(os.getpid())) == 1
        for s in mine:
            s.close()
    finally:
        live.kill()
        live.wait(30)
