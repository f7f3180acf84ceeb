"""Issue 7: GPU update speed, hotswap against checkpoint-engine 0.4.2 and the hardware bound, in one run.

Run on the device tool's nvidia-h200-x2 from the repository root (wheels carried in `.whl/`):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/engine python3 bench/update_speed.py --out $OUT/raw \
        --shapes qwen3-8b --configs 128x8,128x8nf --updates 4 --ce

Per shape: write a synthetic bf16 checkpoint (real Qwen3 layer names and shapes) to /dev/shm, then
  * hotswap: one broadcast member per GPU (stages half into pinned memory, NCCL between the GPUs)
    and one receiver process per GPU filling preallocated parameters through the real hand-off
    (ZeroMQ + CUDA IPC); receivers' parameters poisoned before and compared byte for byte after;
  * checkpoint-engine 0.4.2: its ParameterServer on each GPU (each registers half the shard files),
    and a receiver process per GPU running its `update_weights_from_ipc` with a `run` that copies
    every tensor into preallocated parameters; compared byte for byte after each update;
  * ceilings measured in the same run: pinned host→GPU copy with both GPUs copying, and NCCL
    broadcast between the two GPUs; bound = max(size / (2 × H2D), size / broadcast).
The first update is the cold one; warm = best of the others. checkpoint-engine's update includes its
process-group setup and teardown, which its `ParameterServer(auto_pg=True)` (its default) does
every update.

Not a test (speed goals live here). Roles `bcast-probe`, `ce-rank` and `ce-receiver` are this
script's own subprocesses.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engine"))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9
SHAPES: dict[str, dict[str, int]] = {}


def gbc() -> Any:
    """bench/gpu_broadcast_check.py, whose harness (free ports, H2D probe, member groups) is reused."""
    return importlib.import_module("gpu_broadcast_check")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shape_defs(shape: str) -> list[tuple[str, str, tuple[int, ...]]]:
    from hotswap_engine.testing.checkpoints import QWEN3_8B, qwen3_defs

    if shape == "qwen3-8b":
        return qwen3_defs(**QWEN3_8B)
    if shape == "qwen3-32b":
        return qwen3_defs(
            layers=64, hidden=5120, intermediate=25600, heads=64, kv_heads=8, head_dim=128, vocab=151936
        )
    raise SystemExit(f"unknown shape {shape}")


# ---- ceilings -----------------------------------------------------------------------------------


def bcast_probe(rank: int, port: int, out: Path, nbytes: int = 1 << 30, reps: int = 8) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{rank}")
    for src in (0, 1, 0, 1):
        dist.broadcast(buf, src)
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for i in range(reps):
        dist.broadcast(buf, i % 2)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    if rank == 0:
        out.write_text(json.dumps({"bcast_gbps": nbytes * reps / secs / GB}))
    dist.destroy_process_group()


def measure_bcast(out: Path) -> float:
    port = gbc().free_port()
    res = out / "bcast.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "bcast-probe",
                "--rank",
                str(r),
                "--port",
                str(port),
                "--out",
                str(res),
            ]
        )
        for r in range(2)
    ]
    for p in procs:
        p.wait(timeout=120)
    return float(json.loads(res.read_text())["bcast_gbps"])


# ---- checkpoint-engine ---------------------------------------------------------------------------


def import_checkpoint_engine() -> Any:
    # Its package __init__ imports its HTTP API (fastapi, uvicorn), which the ParameterServer does not
    # need; a stand-in module keeps those out of the carried wheels.
    api = types.ModuleType("checkpoint_engine.api")
    api.request_inference_to_update = None  # type: ignore[attr-defined]
    sys.modules["checkpoint_engine.api"] = api
    return importlib.import_module("checkpoint_engine")


def ce_rank(args: argparse.Namespace) -> int:
    """One checkpoint-engine ParameterServer rank with its receiver process on the same GPU."""
    ce = import_checkpoint_engine()
    rank = args.rank
    torch.cuda.set_device(rank)
    files = sorted(str(p) for p in Path(args.ckpt).glob("*.safetensors"))[rank::2]
    receiver = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "ce-receiver",
            "--rank",
            str(rank),
            "--ckpt",
            args.ckpt,
            "--out",
            str(Path(args.out).with_suffix(f".receiver{rank}.jsonl")),
            "--updates",
            str(args.updates),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    ps = ce.ParameterServer(
        rank=rank, world_size=2, auto_pg=True, master_addr="127.0.0.1", master_port=args.port
    )
    t = time.perf_counter()
    ps.register_checkpoint("ckpt", files=files, use_inplace_pin_memory=False)  # in-place would delete them
    record: dict[str, Any] = {"rank": rank, "register_seconds": time.perf_counter() - t, "files": files}
    ps.gather_metas("ckpt")
    times = []
    assert receiver.stdin is not None
    stdin = receiver.stdin

    def req(socket_paths: list[tuple[str, str]]) -> None:
        mine = dict(socket_paths)[ps._device_uuid]
        stdin.write(mine + "\n")
        stdin.flush()

    ready = Path(args.out).with_suffix(f".receiver{rank}.ready")
    while not ready.exists():  # its reference bytes loaded: the first update's clock excludes that
        if receiver.poll() is not None:
            raise SystemExit(f"checkpoint-engine receiver {rank} exited with {receiver.returncode}")
        time.sleep(0.05)
    for n in range(args.updates):
        key = f"bench-barrier-{n}"
        ps._store.add(key, 1)
        while int(ps._store.add(key, 0)) < 2:
            time.sleep(0.001)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        ps.update("ckpt", req)
        times.append(time.perf_counter() - t)
        record.setdefault("peak_allocated_bytes", []).append(torch.cuda.max_memory_allocated())
        log(f"ce rank {rank} update {n}: {times[-1]:.3f}s")
    stdin.write("quit\n")
    stdin.flush()
    rc = receiver.wait(timeout=300)
    record.update(update_seconds=times, receiver_rc=rc)
    Path(args.out).write_text(json.dumps(record))
    return 0


def ce_receiver(args: argparse.Namespace) -> int:
    import zmq

    ce = import_checkpoint_engine()
    from hotswap_engine.testing.plain_receiver import POISON, allocate, flat_bytes, load_expected, verify

    device = torch.device("cuda", args.rank)
    torch.cuda.set_device(device)
    params = allocate(Path(args.ckpt), device)
    expected = load_expected(Path(args.ckpt), device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    ctx = zmq.Context()
    out = Path(args.out)
    out.with_suffix(".ready").write_text("ready")
    ok = True
    for n in range(args.updates):
        line = sys.stdin.readline().strip()
        if not line or line == "quit":
            break
        for param in params.values():
            flat_bytes(param).fill_(POISON)
        torch.cuda.synchronize()
        got: set[str] = set()

        def run(weights: list[tuple[str, torch.Tensor]], got: set[str] = got) -> None:
            for name, w in weights:
                params[name].copy_(w, non_blocking=True)
                got.add(name)

        t = time.perf_counter()
        ce.update_weights_from_ipc(ctx, line, device.index, run=run)
        secs = time.perf_counter() - t
        bad = verify(params, expected) + sorted(set(params) - got)
        rec = {
            "update": n,
            "seconds": secs,
            "ok": not bad,
            "mismatched": bad[:20],
            "gpu_extra_peak_bytes": torch.cuda.max_memory_allocated(device) - baseline,
        }
        ok = ok and not bad
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    while sys.stdin.readline().strip() not in ("quit", ""):
        pass
    return 0 if ok else 1


def run_ce(ckpt: Path, out: Path, updates: int) -> dict[str, Any]:
    port = gbc().free_port()
    procs = []
    for r in range(2):
        logf = (out / f"ce-rank{r}.log").open("wb")
        # ParameterServer reads `rank or $RANK`: rank 0 needs the variable.
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port - 1),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "ce-rank",
                    "--rank",
                    str(r),
                    "--port",
                    str(port),
                    "--ckpt",
                    str(ckpt),
                    "--updates",
                    str(updates),
                    "--out",
                    str(out / f"ce-rank{r}.json"),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    codes: list[int | None] = []
    deadline = time.monotonic() + 180
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("ce-rank?.json"))]
    recv = [
        [json.loads(x) for x in p.read_text().splitlines()]
        for p in sorted(out.glob("ce-rank?.receiver?.jsonl"))
    ]
    times = [max(r["update_seconds"][u] for r in ranks) for u in range(updates)] if len(ranks) == 2 else []
    return {
        "codes": codes,
        "ok": codes == [0, 0]
        and len(recv) == 2
        and all(len(x) == updates and all(y["ok"] for y in x) for x in recv),
        "update_seconds": times,
        "register_seconds": [r["register_seconds"] for r in ranks],
        "server_peak_allocated_bytes": [max(r.get("peak_allocated_bytes", [0])) for r in ranks],
        "receiver_extra_peak_bytes": [
            max((y.get("gpu_extra_peak_bytes", 0) for y in x), default=0) for x in recv
        ],
    }


# ---- orchestration -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="main")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--shapes", default="qwen3-8b")
    ap.add_argument(
        "--configs", default="128x8", help="BxS in MiB (e.g. 128x8), suffix nf: no full-version copy"
    )
    ap.add_argument("--ce", action="store_true", help="also run checkpoint-engine 0.4.2")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm/hs-speed"))
    args = ap.parse_args()
    if args.role == "bcast-probe":
        bcast_probe(args.rank, args.port, args.out)
        return 0
    if args.role == "ce-rank":
        return ce_rank(args)
    if args.role == "ce-receiver":
        return ce_receiver(args)

    measure_h2d, run_group = gbc().measure_h2d, gbc().run_group
    from hotswap_engine.testing.checkpoints import block_filler, nbytes_of, save_sharded

    args.out.mkdir(parents=True, exist_ok=True)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log(f"torch {torch.__version__}, GPUs: {names}")
    h2d = measure_h2d()
    bcast = measure_bcast(args.out)
    log(
        f"ceilings: H2D {h2d['concurrent_gbps']:.1f} GB/s per GPU (both copying), NCCL bcast {bcast:.1f} GB/s"
    )
    summary: dict[str, Any] = {"torch": torch.__version__, "h2d": h2d, "bcast_gbps": bcast, "rows": []}
    import shutil

    if shutil.disk_usage("/dev/shm").free < 40 * GB:
        args.workdir = Path("/tmp/hs-speed")
    args.workdir.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        defs = shape_defs(shape)
        size = sum(nbytes_of(d, s) for _, d, s in defs)
        ckpt = args.workdir / shape
        t = time.perf_counter()
        save_sharded(ckpt, defs, block_filler(seed=7), shards=8 if size > 40 * GB else 4)
        log(f"{shape}: wrote {size / GB:.2f} GB in {time.perf_counter() - t:.1f}s")
        bound = max(size / (2 * h2d["concurrent_gbps"] * GB), size / (bcast * GB))
        for config in filter(None, args.configs.split(",")):
            extra = ["--no-full"] if config.endswith("nf") else []
            b, s = config.removesuffix("nf").split("x")
            extra += ["--bucket-bytes", str(int(b) << 20), "--slots", s]
            name = f"{shape}-{config}"
            t = time.perf_counter()
            mres, rres, codes = run_group(
                name, ckpt, args.out, world=2, updates=args.updates, verify="last", extra=extra, timeout=400
            )
            ok = all(c == 0 for c in codes.values())
            ok = ok and all(len(m) == args.updates and all(r.get("ok") for r in m) for m in mres)
            ok = ok and all(len(r) == args.updates and all(x.get("ok") for x in r) for r in rres)
            times = (
                [max(float(m[u]["update_seconds"]) for m in mres) for u in range(args.updates)] if ok else []
            )
            row: dict[str, Any] = {
                "name": name,
                "ok": ok,
                "bytes": size,
                "kind": "hotswap",
                "codes": codes,
                "update_seconds": times,
                "bound_seconds": bound,
                "stage_seconds": [m[0].get("stage_seconds") for m in mres if m],
                "staged_bytes": [m[0].get("staged_bytes") for m in mres if m],
                "stage_timings": [m[0].get("stage_timings") for m in mres if m],
                "member_peak_allocated_bytes": [
                    max(int(x.get("gpu_peak_allocated_bytes", 0)) for x in m) for m in mres if m
                ],
                "receiver_extra_peak_bytes": [
                    max(int(x.get("gpu_extra_peak_bytes", 0)) for x in r) for r in rres if r
                ],
                "stats_last": [m[-1].get("stats") for m in mres if m],
            }
            summary["rows"].append(row)
            log(f"{name}: {time.perf_counter() - t:.0f}s {json.dumps(row)}")
        if args.ce:
            t = time.perf_counter()
            ce = run_ce(ckpt, args.out, args.updates)
            ce.update(
                name=f"{shape}-checkpoint-engine", kind="checkpoint-engine", bytes=size, bound_seconds=bound
            )
            summary["rows"].append(ce)
            log(f"checkpoint-engine {shape}: {time.perf_counter() - t:.0f}s {json.dumps(ce)}")
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        for p in ckpt.glob("*"):
            p.unlink()
    print(
        "\nname                          ok    GB     first_s  warm_s   bound_s  frac   stage_GB/s  "
        "peak_MiB(server/receiver)"
    )
    for r in summary["rows"]:
        ts = r.get("update_seconds") or [float("nan")]
        warm = min(ts[1:]) if len(ts) > 1 else ts[0]
        stage = ",".join(
            f"{b / s / GB:.1f}"
            for b, s in zip(r.get("staged_bytes", []), r.get("stage_seconds", []), strict=False)
            if s
        )
        server = (
            "server_peak_allocated_bytes"
            if r["kind"] == "checkpoint-engine"
            else "member_peak_allocated_bytes"
        )
        if r["kind"] == "checkpoint-engine":
            stage = ",".join(f"{r['bytes'] / 2 / s / GB:.1f}" for s in r.get("register_seconds", []))
        mem = f"{[x >> 20 for x in r[server]]}/{[x >> 20 for x in r['receiver_extra_peak_bytes']]}"
        print(
            f"{r['name']:<29} {r['ok']!s:<5} {r['bytes'] / GB:6.2f} {ts[0]:7.3f}  {warm:7.3f}  "
            f"{r['bound_seconds']:7.3f}  {r['bound_seconds'] / warm:5.2f}  {stage:<11} {mem}"
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
