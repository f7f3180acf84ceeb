"""The real agent process with one rank worker per GPU, end to end, without vLLM.

On a machine with 2 GPUs (the device tool's nvidia-h200-x2), from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine:$PWD/testing
    python3 bench/agent_gpu_check.py --device cuda --gpus 2 --kill --out $OUT

What it runs, per pod: `python -m hotswap_testing.plain_launcher` (the launcher's control
socket in front of one plain receiver per GPU with preallocated parameters) and `python -m
hotswap_engine.agent --device cuda --gpus 2` (HTTP API; one rank worker process per GPU: NCCL
group, slots, CUDA IPC hand-off). Then, as the operator would: stage each synthetic version through
the agent's API, start the broadcast update, wait for it, and check every rank's parameters byte
for byte against the checkpoint (parameters are poisoned before every apply). With `--kill`: a rank
worker is SIGKILLed mid-update; the update must fail within the collective timeout, the agent stay
up and roll back (verified byte for byte), a new worker be started, and the next update succeed.

`--device cpu` runs the same on CPU (gloo, shared-memory slots): the engine tests do, with
`--pods 2` (two agents on 127.1.B.2x, world = pods × gpus). With `--membership-change` (and
`--pods 2` or more): every pod first applies a version alone at its own address and a port M (the
operator's catch-up group), then all of them get the next version in one group whose master is
pod-0 at the same port M (the operator's first attempt of a rollout), pod-0 asked last, once the
others are forming the group: it must complete on this first attempt in a few seconds.
Prints one JSON summary line (`AGENT_GPU_CHECK {...}`); exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engine"))
sys.path.insert(0, str(REPO / "testing"))

from hotswap_testing.checkpoints import (  # noqa: E402
    QWEN3_8B,
    mixed_defs,
    qwen3_defs,
    random_filler,
    save_sharded,
)

TOKEN = "agent-gpu-check"
SMALL_QWEN = {**QWEN3_8B, "layers": 2, "hidden": 512, "intermediate": 1536, "vocab": 8192}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 600.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def control_get(sock: Path, path: str) -> dict[str, Any]:
    conn = UnixHTTPConnection(str(sock))
    try:
        conn.request("GET", path)
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PodProcs:
    def __init__(self, name: str, ip: str, args: argparse.Namespace, base: Path, root: Path) -> None:
        self.name, self.ip = name, ip
        self.dir = args.out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "shm").mkdir(exist_ok=True)
        self.control = self.dir / "control.sock"
        self.port = free_port(ip)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(
                [str(REPO / "api"), str(REPO / "engine"), str(REPO / "testing"), env.get("PYTHONPATH", "")]
            )
        )
        env.update(PYTHONUNBUFFERED="1", HOTSWAP_AGENT_TOKEN=TOKEN)
        launcher = ["-m", "hotswap_testing.plain_launcher", "--control-socket", str(self.control)]
        launcher += ["--base", str(base), "--tp", str(args.gpus), "--device", args.device]
        self._spawn("launcher", launcher, env)
        agent = ["-m", "hotswap_engine.agent", "--pod-name", name, "--host", ip, "--port", str(self.port)]
        agent += ["--base-checkpoint", str(base), "--allowed-root", str(root)]
        agent += ["--control-socket", str(self.control)]
        agent += ["--handoff-endpoint", f"ipc://{self.dir}/handoff-{{rank}}.sock"]
        agent += ["--shm-dir", str(self.dir / "shm"), "--device", args.device, "--gpus", str(args.gpus)]
        agent += ["--collective-timeout", str(args.collective_timeout)]
        self._spawn("agent", agent, env)

    def _spawn(self, what: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.dir / f"{what}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[what] = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for what, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name}: {what} exited with {p.returncode}\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5):
                    pass
                if self.control.exists():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not up in {timeout}s\n{self.logs()}")

    def rank_workers(self) -> list[int]:
        """Pids of the agent's rank worker processes."""
        agent = self.procs["agent"].pid
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == agent and b"rank_worker" in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
        return sorted(out)

    def verify(self, checkpoint: Path) -> dict[str, Any]:
        return control_get(self.control, f"/verify?checkpoint={checkpoint}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for what in self.procs:
            p = self.dir / f"{what}.log"
            if p.exists():
                out.append(
                    f"--- {self.name} {what} ---\n"
                    + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def make_checkpoints(root: Path, shape: str, versions: int) -> list[Path]:
    if shape == "mixed":
        defs = mixed_defs()
    else:
        defs = qwen3_defs(**(QWEN3_8B if shape == "qwen3-8b" else SMALL_QWEN))
    out = []
    for seed in range(versions):
        d = root / f"v{seed}"
        if not (d / "model.safetensors.index.json").exists():
            save_sharded(d, defs, random_filler(seed), shards=2)
        out.append(d)
    return out


def group_of(pods: list[PodProcs], port: int) -> dict[str, Any]:
    n = len(pods)
    return {
        "members": [
            {"rank": i, "pod": p.name, "address": p.ip, "part": {"index": i, "count": n} if n > 1 else None}
            for i, p in enumerate(pods)
        ],
        "master_addr": pods[0].ip,
        "master_port": port,
    }


def start_update(p: PodProcs, rank: int, version: str, group: dict[str, Any], **extra: Any) -> str:
    code, body = p.api("POST", "/v1/updates", {"version": version, "rank": rank, "group": group, **extra})
    if code != 202:
        raise RuntimeError(f"{p.name}: update refused ({code}): {body}")
    return str(body["id"])


def update(pods: list[PodProcs], version: str, port: int, **extra: Any) -> list[str]:
    group = group_of(pods, port)
    return [start_update(p, i, version, group, **extra) for i, p in enumerate(pods)]


def wait_stage(p: PodProcs, update_id: str, stages: tuple[str, ...], timeout: float) -> str:
    """Wait until the update is in one of `stages` (or finished); returns its stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = p.api("GET", f"/v1/updates/{update_id}")
        if code == 200 and body["stage"] in (*stages, "Complete", "Failed"):
            return str(body["stage"])
        time.sleep(0.01)
    raise TimeoutError(f"{p.name}: update {update_id} not in {stages} after {timeout}s\n{p.logs()}")


def stage(pods: list[PodProcs], version: str, path: Path) -> float:
    t0 = time.perf_counter()
    n = len(pods)
    for i, p in enumerate(pods):
        part = {"index": i, "count": n} if n > 1 else None
        code, body = p.api(
            "POST", "/v1/stage", {"version": version, "source": {"path": str(path)}, "part": part}
        )
        if code != 201:
            raise RuntimeError(f"{p.name}: stage refused ({code}): {body}")
    return time.perf_counter() - t0


def wait(p: PodProcs, update_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = p.api("GET", f"/v1/updates/{update_id}")
        if code == 200 and body["stage"] in ("Complete", "Failed"):
            return dict(body)
        time.sleep(0.05)
    raise TimeoutError(f"{p.name}: update {update_id} not finished in {timeout}s\n{p.logs()}")


def membership_change(
    pods: list[PodProcs], versions: list[Path], first: int, port: int, args: argparse.Namespace, check: Any
) -> None:
    """Each pod alone at (its address, `port`), then all pods at (pod-0's address, `port`), the
    master asked last: the others reach its port while it still holds its group of one there."""
    version, path = f"v{first}", versions[first]
    for p in pods:
        code, body = p.api("POST", "/v1/stage", {"version": version, "source": {"path": str(path)}})
        if code != 201:
            raise RuntimeError(f"{p.name}: stage refused ({code}): {body}")
        alone = {
            "members": [{"rank": 0, "pod": p.name, "address": p.ip, "part": None}],
            "master_addr": p.ip,
            "master_port": port,
        }
        r = wait(p, start_update(p, 0, version, alone), 600)
        check(f"membership change: {p.name} alone {version}", r["stage"] == "Complete", error=r.get("error"))
    version, path = f"v{first + 1}", versions[first + 1]
    stage(pods, version, path)
    group = group_of(pods, port)
    t0 = time.monotonic()
    ids = {i: start_update(pods[i], i, version, group) for i in range(1, len(pods))}
    for i, update_id in ids.items():
        wait_stage(pods[i], update_id, ("Connecting", "Transferring"), 60)
    # The master's request comes once another member's rank worker reached its port (where its
    # group of one still listens). A fixed worker leaves that store at once and may be missed: the
    # look is bounded well inside the collective timeout.
    early = wait_connected(pods[1].rank_workers(), pods[0].ip, port, min(5.0, args.collective_timeout / 4))
    ids[0] = start_update(pods[0], 0, version, group)
    results = {i: wait(pods[i], ids[i], 600) for i in range(len(pods))}
    seconds = time.monotonic() - t0
    for i, r in sorted(results.items()):
        v = pods[i].verify(path)
        check(
            f"membership change: {pods[i].name} {version} on the first attempt, well within the timeout",
            r["stage"] == "Complete" and v["ok"] and seconds < args.collective_timeout / 2,
            seconds=round(seconds, 2),
            member_at_old_store_first=early,
            error=r.get("error"),
            durations=r["durations"],
            mismatched=v.get("mismatched"),
        )


def tcp_peers(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs process `pid`'s established TCP sockets are connected to (IPv4,
    and IPv4-mapped IPv6: torch's store clients are AF_INET6 sockets)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] != "01" or f[9] not in inodes:  # ESTABLISHED, one of this process's sockets
                    continue
                addr, port = f[2].split(":")
                if len(addr) == 32 and addr.startswith("0000000000000000FFFF0000"):
                    addr = addr[24:]  # IPv4-mapped
                if len(addr) == 8:
                    out.add((socket.inet_ntoa(int(addr, 16).to_bytes(4, "little")), int(port, 16)))
    return out


def wait_connected(pids: list[int], addr: str, port: int, timeout: float) -> bool:
    """Whether one of `pids` was seen connected to `addr:port` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((addr, port) in tcp_peers(pid) for pid in pids):
            return True
        time.sleep(0.001)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpus", type=int, default=2, help="rank workers per agent")
    ap.add_argument("--pods", type=int, default=1, help="agents (each with --gpus workers); cuda: 1")
    ap.add_argument("--shape", choices=["mixed", "small-qwen", "qwen3-8b"], default="small-qwen")
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument(
        "--versions", type=int, default=0, help="checkpoints to use (default: one per update); updates cycle"
    )
    ap.add_argument("--kill", action="store_true", help="SIGKILL a rank worker mid-update, then update again")
    ap.add_argument(
        "--membership-change",
        action="store_true",
        help="each pod alone at its own address and port M, then all at pod-0's address and port M",
    )
    ap.add_argument("--collective-timeout", type=float, default=20.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--checkpoints", type=Path, default=None, help="where the versions are written (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and args.pods != 1:
        ap.error("on cuda one agent owns the machine's GPUs: --pods 1")
    if args.membership_change and args.pods < 2:
        ap.error("--membership-change needs --pods 2 or more")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    made_root = args.checkpoints is None  # not under --out: the device tool copies --out back
    root = Path(tempfile.mkdtemp(prefix="agent-gpu-check-")) if made_root else args.checkpoints.resolve()
    extra = (2 if args.kill else 0) + (2 if args.membership_change else 0)
    if args.versions and extra:
        ap.error("--versions cycles plain updates only (not with --kill / --membership-change)")
    versions = make_checkpoints(root, args.shape, args.versions or 2 + args.updates + extra)
    base = versions[0]
    # Several pods: loopback addresses of their own, outside the dev cluster's pod range
    # (127.0.0.16-254), in a block picked by the pid so that two runs at once do not collide.
    block = 1 + os.getpid() % 250
    ips = ["127.0.0.1"] if args.pods == 1 else [f"127.1.{block}.{21 + i}" for i in range(args.pods)]
    pods = [PodProcs(f"pod-{i}", ip, args, base, root) for i, ip in enumerate(ips)]
    summary: dict[str, Any] = {
        "device": args.device,
        "gpus": args.gpus,
        "pods": args.pods,
        "shape": args.shape,
    }
    checks: list[dict[str, Any]] = []
    ok = True

    def check(name: str, passed: bool, **info: Any) -> None:
        nonlocal ok
        ok = ok and passed
        checks.append({"check": name, "ok": passed, **info})
        print(json.dumps(checks[-1]), flush=True)

    port = free_port(ips[0])
    try:
        t0 = time.perf_counter()
        for p in pods:
            p.wait_up(600)
        summary["start_seconds"] = round(time.perf_counter() - t0, 2)
        workers = {p.name: p.rank_workers() for p in pods}
        check("rank workers started", all(len(w) == args.gpus for w in workers.values()), pids=workers)
        n = 1
        for n in range(1, 1 + args.updates):
            # with --versions, updates cycle through the checkpoints (each under a version name of its own)
            version, path = f"v{n}", versions[1 + (n - 1) % (len(versions) - 1)]
            staged_s = stage(pods, version, path)
            ids = update(pods, version, port + n)
            results = [wait(p, i, 600) for p, i in zip(pods, ids, strict=True)]
            for p, r in zip(pods, results, strict=True):
                v = p.verify(path)
                check(
                    f"{p.name} update {version}",
                    r["stage"] == "Complete" and v["ok"],
                    error=r.get("error"),
                    durations=r["durations"],
                    bytes=r["bytes_total"],
                    stage_seconds=round(staged_s, 3),
                    mismatched=v.get("mismatched"),
                )
        if args.kill:
            served = versions[n]
            version, path = f"v{n + 1}", versions[n + 1]
            stage(pods, version, path)
            total = sum(
                s["bytes"] for s in pods[0].api("GET", "/v1/status")[1]["staged"] if s["version"] == version
            )
            total *= len(pods)
            # Throttled to ~8 s, in ~40 buckets: a bucket's broadcast runs at most `slots` (4) buckets
            # ahead of the paced hand-off, so the kill lands while collectives are still to come.
            bucket = max(4096, total // 40 // 4096 * 4096)
            rate = max(total // 8, 1)
            ids = update(pods, version, port + 100, max_bytes_per_second=rate, bucket_bytes=bucket)
            deadline = time.monotonic() + 120
            when: dict[str, Any] = {}
            while time.monotonic() < deadline:
                _, when = pods[0].api("GET", f"/v1/updates/{ids[0]}")
                if when["stage"] in ("Transferring", "Complete", "Failed") and (
                    when["bytes_done"] > 0 or when["stage"] != "Transferring"
                ):
                    break
                time.sleep(0.02)
            victim = pods[-1].rank_workers()[-1]
            os.kill(victim, signal.SIGKILL)
            t_kill = time.monotonic()
            outcomes = [wait(p, i, 300) for p, i in zip(pods, ids, strict=True)]
            fail_s = time.monotonic() - t_kill
            check(
                "kill: every member's update failed, rolled back, within the collective timeout",
                all(o["stage"] == "Failed" and "rollback" in o["durations"] for o in outcomes)
                and fail_s < 3 * args.collective_timeout + 30,
                stage_when_killed=when.get("stage"),
                seconds_after_kill=round(fail_s, 2),
                errors=[o.get("error") for o in outcomes],
            )
            alive = all(p.procs["agent"].poll() is None for p in pods)
            statuses = [p.api("GET", "/v1/status")[1] for p in pods]
            check(
                "kill: agents stayed up and serve the previous version",
                alive and all(s["ready"] and s["serving_version"] == f"v{n}" for s in statuses),
                serving=[s["serving_version"] for s in statuses],
            )
            for p in pods:
                v = p.verify(served)
                check(
                    f"kill: {p.name} parameters are the previous version byte for byte",
                    v["ok"],
                    mismatched=v.get("mismatched"),
                )
            # On CUDA the rollback's group of one replaces the workers (a new NCCL membership):
            # look until the replacements are up rather than at one instant.
            deadline = time.monotonic() + 60
            while True:
                after = pods[-1].rank_workers()
                if (victim not in after and len(after) == args.gpus) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            check(
                "kill: the killed worker was replaced",
                victim not in after and len(after) == args.gpus,
                pids=after,
            )
            version, path = f"v{n + 2}", versions[n + 2]
            stage(pods, version, path)
            ids = update(pods, version, port + 101)
            results = [wait(p, i, 600) for p, i in zip(pods, ids, strict=True)]
            for p, res in zip(pods, results, strict=True):
                v = p.verify(path)
                check(
                    f"kill: {p.name} next update {version}",
                    res["stage"] == "Complete" and v["ok"],
                    error=res.get("error"),
                    durations=res["durations"],
                    mismatched=v.get("mismatched"),
                )
        if args.membership_change:
            membership_change(pods, versions, len(versions) - 2, port + 200, args, check)
    except Exception as e:
        check("no exception", False, error=f"{type(e).__name__}: {e}")
        for p in pods:
            print(p.logs(60), file=sys.stderr)
    finally:
        for p in pods:
            p.stop()
        if made_root:
            shutil.rmtree(root, ignore_errors=True)
    summary.update(ok=ok, checks=checks)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("AGENT_GPU_CHECK " + json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
