"""The pipelined broadcast on CPU: real gloo process groups on 127.0.0.1, each member with a plain
receiver process behind a real hand-off (ZeroMQ + shared-memory slots).

Every member is a separate process (`hotswap_testing.broadcast_member`) staging its part of
a synthetic checkpoint written here; its receiver (`hotswap_testing.plain_receiver`) fills
preallocated parameters from the hand-off and compares them byte for byte with the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotswap_testing.checkpoints import mixed_defs, random_filler, save_file, save_sharded

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("api", "engine", "operator", "cluster", "testing")),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",
}
# "c.big" (3 MB of F16) is larger than a bucket (256 KiB) and arrives in chunks; 3 slots rotate.
BIG_ELEMENTS = 1_500_000
BUCKET_BYTES = 256 << 10
SLOTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_versions(root: Path) -> tuple[Path, list[Path]]:
    defs = mixed_defs(BIG_ELEMENTS)
    base = root / "base"
    save_sharded(base, defs, random_filler(10), shards=2)
    v1 = root / "v1"
    save_sharded(v1, defs, random_filler(11), shards=3)
    v2 = root / "v2"
    v2.mkdir()
    save_file(v2 / "model.safetensors", defs, random_filler(12), order="reverse")
    return base, [v1, v2]


class Member:
    def __init__(self, proc: subprocess.Popen[str], receiver: subprocess.Popen[str], out: Path, rx_out: Path):
        self.proc, self.receiver, self.out, self.rx_out = proc, receiver, out, rx_out

    def results(self) -> list[dict[str, object]]:
        return list(json.loads(self.out.read_text())) if self.out.exists() else []

    def receiver_results(self) -> list[dict[str, object]]:
        if not self.rx_out.exists():
            return []
        return [json.loads(line) for line in self.rx_out.read_text().splitlines()]

    def kill(self) -> None:
        for p in (self.proc, self.receiver):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """Slots of this test's members: removed afterwards, also those of a killed member."""
    path = Path("/dev/shm") / f"hotswap-test-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_group(
    tmp: Path,
    shm: Path,
    base: Path,
    versions: list[Path],
    world: int,
    *,
    op_timeout: float = 30.0,
    pause: dict[int, int] | None = None,
    trail_full: bool = False,
) -> list[Member]:
    port = free_port()
    members = ",".join(f"pod-{r}" for r in range(world))
    out: list[Member] = []
    for rank in range(world):
        endpoint = f"ipc://{tmp}/handoff-{rank}.sock"
        mout, rout = tmp / f"member-{rank}.json", tmp / f"receiver-{rank}.jsonl"
        cmd = [
            sys.executable, "-m", "hotswap_testing.broadcast_member",
            "--rank", str(rank), "--members", members, "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--bind-host", "127.0.0.1", "--device", "cpu",
            "--base", str(base), "--endpoint", endpoint, "--shm-dir", str(shm),
            "--bucket-bytes", str(BUCKET_BYTES), "--slots", str(SLOTS),
            "--op-timeout", str(op_timeout), "--out", str(mout),
        ]  # fmt: skip
        for v in versions:
            cmd += ["--checkpoint", str(v)]
        if pause and rank in pause:
            cmd += ["--pause-after-bytes", str(pause[rank])]
        if trail_full:
            cmd += ["--trail-full"]
        rcmd = [
            sys.executable, "-m", "hotswap_testing.plain_receiver", "--endpoint", endpoint,
            "--rank", "0", "--device", "cpu", "--base", str(base), "--updates", str(len(versions)),
            "--timeout", str(op_timeout), "--out", str(rout),
        ]  # fmt: skip
        for v in versions:
            rcmd += ["--verify", str(v)]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        receiver = subprocess.Popen(
            rcmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out.append(Member(proc, receiver, mout, rout))
    return out


def wait_all(members: list[Member], timeout: float) -> dict[str, str]:
    logs: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        for i, m in enumerate(members):
            for name, p in (("member", m.proc), ("receiver", m.receiver)):
                left = max(0.1, deadline - time.monotonic())
                stdout, _ = p.communicate(timeout=left)
                logs[f"{name}-{i}"] = stdout
    finally:
        for m in members:
            m.kill()
    return logs


# world 3 fills the full versions in the trailing pass (what GPUs do), world 2 inline with the
# hand-off: both passes of the shared bucket loop on CPU, checked byte for byte by every member.
@pytest.mark.parametrize(("world", "trail_full"), [(2, False), (3, True)])
def test_broadcast_every_receiver_byte_exact(
    tmp_path: Path, shm_dir: Path, world: int, trail_full: bool
) -> None:
    base, versions = write_versions(tmp_path)
    members = start_group(tmp_path, shm_dir, base, versions, world, trail_full=trail_full)
    logs = wait_all(members, timeout=600)  # process start-up dominates on a loaded 2-core machine
    for rank, m in enumerate(members):
        results = m.results()
        assert m.proc.returncode == 0, logs
        assert [r["ok"] for r in results] == [True, True], results
        for r in results:
            stats = r["stats"]
            assert isinstance(stats, dict)
            assert r["buckets"] == stats["buckets"] and int(str(r["buckets"])) > world  # several buckets
            assert stats["owned_bytes"] > 0  # every member broadcast its own part
            # the group is formed once and kept for the second update
        assert float(str(results[1]["connect_seconds"])) < 0.05, results
        rx = m.receiver_results()
        assert m.receiver.returncode == 0, logs[f"receiver-{rank}"]
        assert [(r["version"], r["ok"]) for r in rx] == [("v0", True), ("v1", True)], rx


@pytest.mark.parametrize(("world", "victim"), [(3, 1), (2, 0)])
def test_member_killed_mid_broadcast_fails_the_others(
    tmp_path: Path, shm_dir: Path, world: int, victim: int
) -> None:
    base, versions = write_versions(tmp_path)
    op_timeout = 20.0
    members = start_group(
        tmp_path, shm_dir, base, versions[:1], world, op_timeout=op_timeout, pause={victim: 1}
    )
    try:
        proc = members[victim].proc
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the victim is inside the update
            if "PAUSED" in line:
                break
        else:
            pytest.fail("the victim never reached the pause point")
        t_kill = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        for rank, m in enumerate(members):
            if rank == victim:
                continue
            # bounded: the process ends (slack for interpreter exit on a loaded 2-core machine)
            m.proc.wait(timeout=op_timeout + 60)
            results = m.results()
            assert m.proc.returncode == 1 and results and results[0]["ok"] is False, results
            assert "BroadcastError" in str(results[0]["error"]), results
            # the failure is seen once the gloo connection (or the store) closes, before the op timeout
            detected = float(str(results[0]["failed_at"])) - t_kill
            assert 0 <= detected < op_timeout / 2, detected
            m.receiver.wait(timeout=15)
            rx = m.receiver_results()
            assert m.receiver.returncode == 1 and rx and rx[0]["ok"] is False, rx
            assert "Aborted" in str(rx[0].get("error")) or "Lost" in str(rx[0].get("error")), rx
    finally:
        for m in members:
            m.kill()


def test_group_cache_keeps_group_while_membership_unchanged() -> None:
    import torch
    from hotswap_engine.transport.process_group import GroupCache, GroupSpec

    cache = GroupCache()
    cpu = torch.device("cpu")
    try:
        spec = GroupSpec(("pod-a",), "127.0.0.1", free_port(), "gloo")
        first = cache.get(spec, 0, bind_host="127.0.0.1", device=cpu, timeout=10)
        assert cache.get(spec, 0, bind_host="127.0.0.1", device=cpu, timeout=10) is first
        moved = GroupSpec(("pod-a",), "127.0.0.1", free_port(), "gloo")
        second = cache.get(moved, 0, bind_host="127.0.0.1", device=cpu, timeout=10)
        assert second is not first and first.broken and not second.broken
        t = torch.arange(4, dtype=torch.uint8)
        second.broadcast(t, 0).wait()
        cache.discard()
        assert second.broken and cache.current is None and not cache.needs_exit
    finally:
        cache.discard()
