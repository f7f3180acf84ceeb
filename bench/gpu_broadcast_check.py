"""GPU verification of the broadcast update (issue 3 item 7): NCCL between GPUs, CUDA IPC into a plain
receiver process per GPU, byte-exact checks, timings against the host→GPU bound.

Run on a machine with 2 GPUs (the device tool's nvidia-h200-x2), from the repository root:

    PYTHONPATH=api:engine:testing python3 bench/gpu_broadcast_check.py --out $OUT

Phases: (1) pinned host→GPU bandwidth with both GPUs copying at once; (2) for each checkpoint
shape (a small mixed one, and Qwen3-8B-shaped bf16), write a synthetic sharded safetensors
checkpoint, start one broadcast member (rank r on cuda:r, staging half) and one plain receiver
per GPU, run `--updates` updates (the first is cold), verify every receiver's parameters and every
member's full-version host buffers byte for byte; (3) optionally kill a member mid-update and check
the other one fails within the op timeout instead of hanging. Prints a table; logs go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engine"))
sys.path.insert(0, str(REPO / "testing"))

from hotswap_testing.checkpoints import (  # noqa: E402
    QWEN3_8B,
    block_filler,
    mixed_defs,
    nbytes_of,
    qwen3_defs,
    save_sharded,
)

GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_h2d(nbytes: int = 2 << 30, reps: int = 5) -> dict[str, float]:
    """Pinned host→device GB/s per GPU, alone and with every GPU copying at once (median of reps)."""
    count = torch.cuda.device_count()
    hosts = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    devs = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(count)]
    streams = [torch.cuda.Stream(f"cuda:{i}") for i in range(count)]
    for h in hosts:
        h.fill_(7)

    def run(which: list[int]) -> float:
        times = []
        for _ in range(reps):
            for i in which:
                torch.cuda.synchronize(i)
            t = time.perf_counter()
            for i in which:
                with torch.cuda.stream(streams[i]):
                    devs[i].copy_(hosts[i], non_blocking=True)
            for i in which:
                streams[i].synchronize()
            times.append(time.perf_counter() - t)
        return nbytes / sorted(times)[len(times) // 2] / GB

    run(list(range(count)))  # warm-up
    out = {"alone_gbps": run([0]), "concurrent_gbps": run(list(range(count)))}
    hosts.clear()
    devs.clear()
    torch.cuda.empty_cache()
    return out


def start(cmd: list[str], logfile: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=logfile.open("wb"), stderr=subprocess.STDOUT, env=env)


def run_group(
    name: str,
    ckpt: Path,
    out: Path,
    *,
    world: int,
    updates: int,
    verify: str,
    extra: list[str],
    timeout: float,
    op_timeout: float = 60.0,
    pause_rank: int | None = None,
) -> tuple[list[list[dict[str, object]]], list[list[dict[str, object]]], dict[str, int | None]]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "api"), str(REPO / "engine"), str(REPO / "testing"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    port = free_port()
    members = ",".join(f"gpu-{r}" for r in range(world))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for r in range(world):
        endpoint = f"ipc:///tmp/hs-{name}-{r}.sock"
        mcmd = [
            sys.executable, "-m", "hotswap_testing.broadcast_member", "--rank", str(r),
            "--members", members, "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--bind-host", "127.0.0.1", "--device", f"cuda:{r}", "--base", str(ckpt),
            "--endpoint", endpoint, "--verify", verify, "--op-timeout", str(op_timeout),
            "--out", str(out / f"{name}-member{r}.json"), *extra,
        ]  # fmt: skip
        mcmd += ["--checkpoint", str(ckpt)] * updates
        if pause_rank == r:
            mcmd += ["--pause-after-bytes", "1"]
        rcmd = [
            sys.executable, "-m", "hotswap_testing.plain_receiver", "--endpoint", endpoint,
            "--rank", "0", "--device", f"cuda:{r}", "--base", str(ckpt), "--updates", str(updates),
            "--timeout", str(op_timeout), "--out", str(out / f"{name}-receiver{r}.jsonl"),
        ]  # fmt: skip
        rcmd += ["--verify", str(ckpt)] * updates
        procs[f"member{r}"] = start(mcmd, out / f"{name}-member{r}.log", env)
        procs[f"receiver{r}"] = start(rcmd, out / f"{name}-receiver{r}.log", env)
    if pause_rank is not None:
        victim = procs[f"member{pause_rank}"]
        logf = out / f"{name}-member{pause_rank}.log"
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end and "PAUSED" not in logf.read_text(errors="replace"):
            time.sleep(0.2)
        log(f"{name}: killing member {pause_rank} mid-update")
        kill_t = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    for key, p in procs.items():
        try:
            codes[key] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes[key] = None  # hung
    if pause_rank is not None:
        codes["seconds_after_kill"] = int(time.monotonic() - kill_t)
        codes["kill_wall_time"] = int(time.time() - (time.monotonic() - kill_t))
    mres, rres = [], []
    for r in range(world):
        mp = out / f"{name}-member{r}.json"
        mres.append(json.loads(mp.read_text()) if mp.exists() else [])
        rp = out / f"{name}-receiver{r}.jsonl"
        rres.append([json.loads(x) for x in rp.read_text().splitlines()] if rp.exists() else [])
    return mres, rres, codes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--shapes", default="small,qwen3-8b")
    ap.add_argument(
        "--configs", default="budget", help="comma list: budget (2 GiB default) or BxS e.g. 256x4 (MiB)"
    )
    ap.add_argument("--kill-test", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    world = torch.cuda.device_count()
    log(f"torch {torch.__version__}, {world} GPUs: {[torch.cuda.get_device_name(i) for i in range(world)]}")
    if world < 2:
        log("needs 2 GPUs")
        return 2
    world = 2
    summary: dict[str, object] = {"torch": torch.__version__}
    h2d = measure_h2d()
    summary["h2d"] = h2d
    log(
        f"pinned host→GPU: {h2d['alone_gbps']:.1f} GB/s alone, "
        f"{h2d['concurrent_gbps']:.1f} GB/s per GPU concurrent"
    )

    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    work = args.workdir or (Path("/dev/shm/hs") if shm_free > 60 * GB else Path("/tmp/hs"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        if shape == "small":
            defs = mixed_defs(big_elements=40_000_000)  # 80 MB F16 tensor: chunked
        elif shape == "qwen3-8b":
            defs = qwen3_defs(**QWEN3_8B)
        else:
            raise SystemExit(f"unknown shape {shape}")
        size = sum(nbytes_of(d, s) for _, d, s in defs)
        ckpt = work / shape
        t = time.perf_counter()
        save_sharded(ckpt, defs, block_filler(seed=hash(shape) & 0xFFFF), shards=4 if size > 1e9 else 2)
        log(f"{shape}: wrote {size / GB:.2f} GB in {time.perf_counter() - t:.1f}s to {ckpt}")
        for config in args.configs.split(","):
            extra: list[str] = []
            if config.endswith("nf"):  # no full-version host copy: its cost, by difference
                extra.append("--no-full")
            layout = config.removesuffix("nf")
            if layout != "budget":
                b, s = layout.split("x")
                extra += ["--bucket-bytes", str(int(b) << 20), "--slots", s]
            name = f"{shape}-{config}"
            verify = "all" if size < 1e9 else "last"
            t = time.perf_counter()
            mres, rres, codes = run_group(
                name,
                ckpt,
                args.out,
                world=world,
                updates=args.updates,
                verify=verify,
                extra=extra,
                timeout=150 if size > 1e9 else 60,
            )
            log(f"{name}: finished in {time.perf_counter() - t:.1f}s, exit codes {codes}")
            ok = all(c == 0 for c in codes.values())
            ok = ok and all(len(m) == args.updates and all(r.get("ok") for r in m) for m in mres)
            ok = ok and all(len(r) == args.updates and all(x.get("ok") for x in r) for r in rres)
            bound = size / (world * h2d["concurrent_gbps"] * GB)
            times = []
            for u in range(args.updates):
                per_rank = [m[u] for m in mres if len(m) > u]
                secs = [float(str(x["update_seconds"])) for x in per_rank if "update_seconds" in x]
                times.append(max(secs) if secs else float("nan"))
            stage_s = [float(str(m[0].get("stage_seconds", "nan"))) for m in mres if m]
            staged_b = [int(str(m[0].get("staged_bytes", 0))) for m in mres if m]
            stats0 = mres[0][-1].get("stats", {}) if mres and mres[0] else {}
            row: dict[str, Any] = {
                "name": name,
                "ok": ok,
                "bytes": size,
                "bucket_bytes": mres[0][0].get("bucket_bytes") if mres and mres[0] else None,
                "slots": mres[0][0].get("slots") if mres and mres[0] else None,
                "update_seconds": times,
                "first": times[0],
                "best_warm": min(times[1:]) if len(times) > 1 else times[0],
                "bound_seconds": bound,
                "fraction_of_bound": bound / min(times[1:] or times),
                "stage_gbps": [b / s / GB for b, s in zip(staged_b, stage_s, strict=False) if s > 0],
                "last_stats_rank0": stats0,
                "receiver_seconds": [[x.get("seconds") for x in r] for r in rres],
                "codes": codes,
            }
            rows.append(row)
            log(json.dumps(row))
    if args.kill_test:
        ckpt = work / "qwen3-8b" if (work / "qwen3-8b").exists() else work / "small"
        mres, rres, codes = run_group(
            "kill", ckpt, args.out, world=world, updates=1, verify="none",
            extra=["--bucket-bytes", str(64 << 20), "--slots", "4"],
            timeout=90, op_timeout=15.0, pause_rank=1,
        )  # fmt: skip
        survivor = mres[0][0] if mres[0] else {}
        summary["kill_test"] = {"codes": codes, "survivor": survivor, "receiver0": rres[0]}
        log(f"kill test: codes {codes}; survivor: {survivor.get('error')}")
    summary["rows"] = rows
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\nname                 ok    GB     bucket   slots  first_s  warm_s   bound_s  frac   stage_GB/s")
    for r in rows:
        print(
            f"{r['name']:<20} {r['ok']!s:<5} {r['bytes'] / GB:6.2f} "
            f"{int(str(r['bucket_bytes'] or 0)) >> 20:5d}MiB "
            f"{r['slots']!s:>5}  {r['first']:7.3f}  {r['best_warm']:7.3f}  {r['bound_seconds']:7.3f}  "
            f"{r['fraction_of_bound']:5.2f}  {','.join(f'{x:.1f}' for x in r['stage_gbps'])}"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
