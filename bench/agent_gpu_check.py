"""The real agent process with one rank worker per GPU, end to end, without vLLM.

On a machine with 2 GPUs (the device tool's nvidia-h200-x2), from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/engine:$PWD/testing
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
`--pods 2` (two agents on 127.1.B.2x, world = pods × gpus). Prints one JSON summary line
(`AGENT_GPU_CHECK {...}`); exit status 0 only if every check passed.
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
                [str(REPO / "engine"), str(REPO / "testing"), env.get("PYTHONPATH", "")]
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


def update(pods: list[PodProcs], version: str, port: int, **extra: Any) -> list[str]:
    n = len(pods)
    group = {
        "members": [
            {"rank": i, "pod": p.name, "address": p.ip, "part": {"index": i, "count": n} if n > 1 else None}
            for i, p in enumerate(pods)
        ],
        "master_addr": pods[0].ip,
        "master_port": port,
    }
    ids = []
    for i, p in enumerate(pods):
        code, body = p.api("POST", "/v1/updates", {"version": version, "rank": i, "group": group, **extra})
        if code != 202:
            raise RuntimeError(f"{p.name}: update refused ({code}): {body}")
        ids.append(body["id"])
    return ids


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
    ap.add_argument("--collective-timeout", type=float, default=20.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--checkpoints", type=Path, default=None, help="where the versions are written (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and args.pods != 1:
        ap.error("on cuda one agent owns the machine's GPUs: --pods 1")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    made_root = args.checkpoints is None  # not under --out: the device tool copies --out back
    root = Path(tempfile.mkdtemp(prefix="agent-gpu-check-")) if made_root else args.checkpoints.resolve()
    versions = make_checkpoints(root, args.shape, args.versions or 2 + args.updates + (2 if args.kill else 0))
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
            r: dict[str, Any] = {}
            while time.monotonic() < deadline:
                _, r = pods[0].api("GET", f"/v1/updates/{ids[0]}")
                if r["stage"] in ("Transferring", "Complete", "Failed") and (
                    r["bytes_done"] > 0 or r["stage"] != "Transferring"
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
                stage_when_killed=r.get("stage"),
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
