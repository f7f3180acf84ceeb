"""Issue 7: GPU update speed, hotswap against checkpoint-engine 0.4.2 and the hardware bound, in one run.

Run on the device tool's nvidia-h200-x2 from the repository root (wheels carried in `.whl/`):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine:$PWD/testing python3 bench/update_speed.py --out $OUT/raw \
        --shapes qwen3-8b --configs 64x16tf,128x8,64x16nf --updates 4 --ce

Configs `BxS`: S slots of B MiB per GPU; suffix none = full-version device→host copy inline, `tf` =
trailing (after the workers' done, `trail_full=True`), `nf` = no full-version copy (its cost).

Per shape: write a synthetic bf16 checkpoint (real Qwen3 layer names and shapes) to /dev/shm, then
  * hotswap: one broadcast member per GPU (stages half into pinned memory, NCCL between the GPUs)
    and one receiver process per GPU filling preallocated parameters through the real hand-off
    (ZeroMQ + CUDA IPC); receivers' parameters poisoned before and compared byte for byte with the
    checkpoint files after every update, members' full-version buffers after the last one;
  * checkpoint-engine 0.4.2: its ParameterServer on each GPU (each registers half the shard files),
    and a receiver process per GPU running its `update_weights_from_ipc` with a `run` that copies
    every tensor into preallocated parameters; compared byte for byte after each update;
  * ceilings measured in the same run: pinned host→GPU copy with both GPUs copying, the same with
    GPU→host at once (the inline full-version copy's ceiling), and NCCL broadcast between the two
    GPUs; bound = max(size / (2 × H2D), size / broadcast).
The first update is the cold one; warm = best of the others. Per config it prints the update (until
the receivers' done), the full-version completion, and per-stage totals from the members' CUDA-event
timeline (the per-bucket timeline of rank 0's last update is in summary.json). checkpoint-engine's
update includes its process-group setup and teardown, which its `ParameterServer(auto_pg=True)`
(its default) does every update.

Not a test (speed goals live here). Roles `bcast-probe`, `stage-probe`, `ce-rank` and
`ce-receiver` are this script's own subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(REPO / "testing"))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9
SHAPES: dict[str, dict[str, int]] = {}


def gbc() -> Any:
    """bench/gpu_broadcast_check.py, whose harness (free ports, H2D probe, member groups) is reused."""
    return importlib.import_module("gpu_broadcast_check")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shape_defs(shape: str) -> list[tuple[str, str, tuple[int, ...]]]:
    from hotswap_testing.checkpoints import QWEN3_8B, qwen3_defs

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


def measure_duplex(nbytes: int = 2 << 30, reps: int = 5) -> dict[str, float]:
    """Both GPUs copying host→GPU and GPU→host at once (what an update with the full-version copy
    inline asks of the host links): GB/s per GPU per direction, and the sum of both directions."""
    count = min(2, torch.cuda.device_count())
    up = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    down = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    dev = [torch.empty(2 * nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(count)]
    s_up = [torch.cuda.Stream(f"cuda:{i}") for i in range(count)]
    s_down = [torch.cuda.Stream(f"cuda:{i}") for i in range(count)]
    times = []
    for r in range(reps + 1):
        for i in range(count):
            torch.cuda.synchronize(i)
        t = time.perf_counter()
        for i in range(count):
            with torch.cuda.stream(s_up[i]):
                dev[i][:nbytes].copy_(up[i], non_blocking=True)
            with torch.cuda.stream(s_down[i]):
                down[i].copy_(dev[i][nbytes:], non_blocking=True)
        for i in range(count):
            s_up[i].synchronize()
            s_down[i].synchronize()
        if r:
            times.append(time.perf_counter() - t)
    per_dir = nbytes / sorted(times)[len(times) // 2] / GB
    del up, down, dev
    torch.cuda.empty_cache()
    return {"per_direction_gbps": per_dir, "both_directions_gbps": 2 * per_dir}


def host_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"cpus": os.cpu_count()}
    for name in ("enabled", "shmem_enabled"):
        with contextlib.suppress(OSError):
            facts[f"thp_{name}"] = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
    return facts


def stage_probe(args: argparse.Namespace) -> int:
    """One rank's cold staging of its half (fresh pinned buffer), as the members do it."""
    from hotswap_api.protocol import PartSpec
    from hotswap_engine.staging import stage

    torch.cuda.set_device(args.rank)
    ckpt = Path(args.ckpt)
    t = time.perf_counter()
    staged = stage(ckpt, PartSpec(index=args.rank, count=2), [ckpt.parent], None, prefault=args.prefault)
    secs = time.perf_counter() - t
    rec = {"seconds": secs, "bytes": staged.nbytes, "gbps": staged.nbytes / secs / GB, **staged.timings}
    Path(args.out).write_text(json.dumps(rec))
    return 0


PROBE = [sys.executable, __file__, "--role", "stage-probe"]


def run_stage_probe(ckpt: Path, out: Path) -> dict[str, Any]:
    variants: dict[str, list[str]] = {"read-then-pin": [], "prefault-read-pin": ["--prefault"]}
    res: dict[str, Any] = {}
    for name, flags in variants.items():
        outs = [out / f"stage-probe-{name}-{r}.json" for r in range(2)]
        procs = [
            subprocess.Popen([*PROBE, "--rank", str(r), "--ckpt", str(ckpt), "--out", str(outs[r]), *flags])
            for r in range(2)
        ]
        codes = [p.wait(timeout=300) for p in procs]
        res[name] = [
            json.loads(o.read_text()) if o.exists() else {"rc": c} for o, c in zip(outs, codes, strict=True)
        ]
    return res


# ---- checkpoint-engine ---------------------------------------------------------------------------


def import_checkpoint_engine() -> Any:
    # Its package __init__ imports its HTTP API (fastapi, uvicorn), which the ParameterServer does not
    # need; a stand-in module keeps those out of the carried wheels.
    # With Mooncake importable (this run carries it for issue 5), its ParameterServer would start a
    # P2PStore, which needs RDMA NICs (none here): hide Mooncake, as in runs without it.
    sys.modules["mooncake"] = None  # type: ignore[assignment]
    sys.modules["mooncake.engine"] = None  # type: ignore[assignment]
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

    for n in range(args.updates):
        # The receiver is ready (set up, or done checking the last update): the clock excludes that.
        ready = Path(args.out).with_suffix(f".receiver{rank}.ready{n}")
        while not ready.exists():
            if receiver.poll() is not None:
                raise SystemExit(f"checkpoint-engine receiver {rank} exited with {receiver.returncode}")
            time.sleep(0.01)
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
    from hotswap_testing.plain_receiver import POISON, FileReference, allocate, flat_bytes

    device = torch.device("cuda", args.rank)
    torch.cuda.set_device(device)
    params = allocate(Path(args.ckpt), device)
    reference = FileReference(Path(args.ckpt), device)  # compared from the files: no second copy
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    ctx = zmq.Context()
    out = Path(args.out)
    ok = True
    for n in range(args.updates):
        out.with_suffix(f".ready{n}").write_text("ready")
        line = sys.stdin.readline().strip()
        if not line or line == "quit":
            break
        for param in params.values():
            flat_bytes(param).fill_(POISON)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        got: set[str] = set()

        def run(weights: list[tuple[str, torch.Tensor]], got: set[str] = got) -> None:
            for name, w in weights:
                params[name].copy_(w, non_blocking=True)
                got.add(name)

        t = time.perf_counter()
        ce.update_weights_from_ipc(ctx, line, device.index, run=run)
        secs = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) - baseline
        bad = reference.mismatched(params) + sorted(set(params) - got)
        rec = {
            "update": n,
            "seconds": secs,
            "ok": not bad,
            "mismatched": bad[:20],
            "gpu_extra_peak_bytes": peak,
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
    deadline = time.monotonic() + 420
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
    ap.add_argument("--stage-probe", action="store_true", help="time staging variants (both ranks at once)")
    ap.add_argument("--prefault", action="store_true", help="stage-probe role: prefault the buffer first")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm/hs-speed"))
    args = ap.parse_args()
    if args.role == "bcast-probe":
        bcast_probe(args.rank, args.port, args.out)
        return 0
    if args.role == "ce-rank":
        return ce_rank(args)
    if args.role == "stage-probe":
        return stage_probe(args)
    if args.role == "ce-receiver":
        return ce_receiver(args)

    measure_h2d, run_group = gbc().measure_h2d, gbc().run_group
    from hotswap_testing.checkpoints import block_filler, nbytes_of, save_sharded

    args.out.mkdir(parents=True, exist_ok=True)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log(f"torch {torch.__version__}, GPUs: {names}, host: {host_facts()}")
    h2d = measure_h2d()
    duplex = measure_duplex()
    bcast = measure_bcast(args.out)
    log(
        f"ceilings: H2D {h2d['concurrent_gbps']:.1f} GB/s per GPU (both copying), H2D+D2H at once "
        f"{duplex['per_direction_gbps']:.1f} GB/s per direction, NCCL bcast {bcast:.1f} GB/s"
    )
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "host": host_facts(),
        "h2d": h2d,
        "duplex": duplex,
        "bcast_gbps": bcast,
        "rows": [],
    }
    import shutil

    args.workdir.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        defs = shape_defs(shape)
        size = sum(nbytes_of(d, s) for _, d, s in defs)
        workdir = args.workdir
        if shutil.disk_usage(workdir).free < size * 1.1:
            workdir = Path("/tmp/hs-speed")
            workdir.mkdir(parents=True, exist_ok=True)
        ckpt = workdir / shape
        t = time.perf_counter()
        save_sharded(ckpt, defs, block_filler(seed=7), shards=8 if size > 40 * GB else 4)
        log(f"{shape}: wrote {size / GB:.2f} GB in {time.perf_counter() - t:.1f}s to {ckpt}")
        if args.stage_probe:
            summary.setdefault("stage_probe", {})[shape] = run_stage_probe(ckpt, args.out)
            log(f"stage probe: {json.dumps(summary['stage_probe'][shape])}")
        bound = max(size / (2 * h2d["concurrent_gbps"] * GB), size / (bcast * GB))
        # With the full-version copy during the update each GPU also moves the other half to host:
        # the host link carries both directions at once.
        bound_inline = max(bound, size / (2 * duplex["per_direction_gbps"] * GB))
        for i, config in enumerate(filter(None, args.configs.split(","))):
            mode = "none" if config.endswith("nf") else "trail" if config.endswith("tf") else "inline"
            extra = {"none": ["--no-full"], "trail": ["--trail-full"], "inline": []}[mode]
            if i == 0:
                extra.append("--stage-again")  # also time staging into a reused pinned buffer
            b, s = config.removesuffix("nf").removesuffix("tf").split("x")
            extra += ["--bucket-bytes", str(int(b) << 20), "--slots", s]
            name = f"{shape}-{config}"
            t = time.perf_counter()
            mres, rres, codes = run_group(
                name, ckpt, args.out, world=2, updates=args.updates, verify="last", extra=extra, timeout=600
            )
            row = hotswap_row(name, mode, size, bound, bound_inline, mres, rres, codes, args.updates)
            summary["rows"].append(row)
            log(
                f"{name}: {time.perf_counter() - t:.0f}s {json.dumps({k: row[k] for k in SHORT if k in row})}"
            )
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
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
    print_table(summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


SHORT = ("ok", "update_seconds", "full_seconds", "bound_seconds", "stages", "stage_gbps", "restage_gbps")


def hotswap_row(
    name: str,
    mode: str,
    size: int,
    bound: float,
    bound_inline: float,
    mres: list[list[dict[str, Any]]],
    rres: list[list[dict[str, Any]]],
    codes: dict[str, int | None],
    updates: int,
) -> dict[str, Any]:
    ok = all(c == 0 for c in codes.values())
    ok = ok and all(len(m) == updates and all(r.get("ok") for r in m) for m in mres)
    ok = ok and all(len(r) == updates and all(x.get("ok") for x in r) for r in rres)
    # The update = until every member's workers reported done (the engine has the new weights);
    # full = until the full-version host copy is complete too (equal, except with trailing copy).
    handoff = [max(float(m[u]["handoff_seconds"]) for m in mres) for u in range(updates)] if ok else []
    full = [max(float(m[u]["update_seconds"]) for m in mres) for u in range(updates)] if ok else []
    last = [m[-1].get("stats", {}) for m in mres if m]
    # Receivers: copy (apply) device time and when they finished, relative to the members' start.
    rx_last = [r[-1] for r in rres if r]
    starts = [float(m[-1].get("start_wall", 0)) for m in mres if m]
    stages = {
        "h2d_device_s": [round(x.get("host_to_slot_seconds", 0), 4) for x in last],
        "h2d_gbps": [
            round(x.get("owned_bytes", 0) / x["host_to_slot_seconds"] / GB, 1)
            if x.get("host_to_slot_seconds")
            else 0
            for x in last
        ],
        "bcast_device_s": [round(x.get("broadcast_seconds", 0), 4) for x in last],
        "d2h_device_s": [round(x.get("slot_to_host_seconds", 0), 4) for x in last],
        "gpu_span_s": [round(x.get("gpu_span_seconds", 0), 4) for x in last],
        "host_wait_acks_s": [round(x.get("wait_free_seconds", 0), 4) for x in last],
        "host_wait_bcast_s": [round(x.get("wait_ready_seconds", 0), 4) for x in last],
        "host_send_s": [round(x.get("send_seconds", 0), 4) for x in last],
        "loop_s": [round(x.get("seconds", 0), 4) for x in last],
        "end_wait_s": [round(x.get("end_seconds", 0), 4) for x in last],
        "apply_device_s": [round(float(r.get("apply_device_seconds", 0)), 4) for r in rx_last],
        "receiver_done_after_start_s": [
            round(float(r.get("end_wall", 0)) - min(starts), 4) if starts else None for r in rx_last
        ],
        "drain_acks_s": [round(x.get("drain_seconds", 0), 4) for x in last],
        # Receivers' wall clock, from the members' start: last entry seen, END seen, done sent.
        "receiver_last_entry_s": [rel(r, "last_entry_wall", starts) for r in rx_last],
        "receiver_end_seen_s": [rel(r, "end_received_wall", starts) for r in rx_last],
        "receiver_done_sent_s": [rel(r, "done_sent_wall", starts) for r in rx_last],
        "trail_s": [round(x.get("trail_seconds", 0), 4) for x in last],
        "trail_h2d_device_s": [round(x.get("trail_host_to_slot_seconds", 0), 4) for x in last],
        "trail_d2h_device_s": [round(x.get("trail_slot_to_host_seconds", 0), 4) for x in last],
        "warm_up_s": [round(float(m[0].get("warm_up_seconds", 0)), 4) for m in mres if m],
    }
    first = [m[0] for m in mres if m]
    return {
        "name": name,
        "kind": "hotswap",
        "mode": mode,
        "ok": ok,
        "bytes": size,
        "codes": codes,
        "update_seconds": handoff,
        "full_seconds": full,
        "bound_seconds": bound,
        "bound_inline_seconds": bound_inline,
        "stages": stages,
        "stage_seconds": [f.get("stage_seconds") for f in first],
        "staged_bytes": [f.get("staged_bytes") for f in first],
        "stage_timings": [f.get("stage_timings") for f in first],
        "stage_gbps": [
            round(f["staged_bytes"] / f["stage_seconds"] / GB, 2) for f in first if f.get("stage_seconds")
        ],
        "restage_gbps": [
            round(f["staged_bytes"] / f["restage_seconds"] / GB, 2) for f in first if f.get("restage_seconds")
        ],
        "restage_timings": [f.get("restage_timings") for f in first],
        "member_peak_allocated_bytes": [
            max(int(x.get("gpu_peak_allocated_bytes", 0)) for x in m) for m in mres if m
        ],
        "receiver_extra_peak_bytes": [
            max(int(x.get("gpu_extra_peak_bytes", 0)) for x in r) for r in rres if r
        ],
        "receiver_verify_seconds": [[x.get("verify_seconds") for x in r] for r in rres],
        "member_verified": [[x.get("verified") for x in m] for m in mres],
        "timeline_rank0": mres[0][-1].get("timeline") if mres and mres[0] else None,
        "trail_timeline_rank0": mres[0][-1].get("trail_timeline") if mres and mres[0] else None,
        "receiver_timeline_rank0": rx_last[0].get("timeline") if rx_last else None,
    }


def rel(record: dict[str, Any], key: str, starts: list[float]) -> float | None:
    return round(float(record[key]) - min(starts), 4) if key in record and starts else None


def mib(server: list[int], receiver: list[int]) -> str:
    return f"{[x >> 20 for x in server]}/{[x >> 20 for x in receiver]}"


def print_table(summary: dict[str, Any]) -> None:
    print(
        "\nname                       mode    ok    GB     first_s warm_s  full_warm_s bound_s frac  "
        "stage_GB/s restage_GB/s peak_MiB(server/receiver)"
    )
    ce = {r["name"].split("-checkpoint")[0]: r for r in summary["rows"] if r["kind"] == "checkpoint-engine"}
    for r in summary["rows"]:
        ts = r.get("update_seconds") or [float("nan")]
        warm = min(ts[1:]) if len(ts) > 1 else ts[0]
        if r["kind"] == "checkpoint-engine":
            stage = ",".join(f"{r['bytes'] / 2 / s / GB:.1f}" for s in r.get("register_seconds", []))
            mem = mib(r["server_peak_allocated_bytes"], r["receiver_extra_peak_bytes"])
            print(
                f"{r['name']:<26} {'ce':<7} {r['ok']!s:<5} {r['bytes'] / GB:6.2f} {ts[0]:7.3f} {warm:7.3f} "
                f"{'':11} {r['bound_seconds']:7.3f} {r['bound_seconds'] / warm:5.2f} {stage:<10} "
                f"{'':12} {mem}"
            )
            continue
        fs = r.get("full_seconds") or [float("nan")]
        fwarm = min(fs[1:]) if len(fs) > 1 else fs[0]
        mem = mib(r["member_peak_allocated_bytes"], r["receiver_extra_peak_bytes"])
        shape = r["name"].rsplit("-", 1)[0]
        vs = ""
        if shape in ce and ce[shape].get("update_seconds"):
            cts = ce[shape]["update_seconds"]
            vs = f" vs-ce {min(cts[1:] or cts) / warm:.1f}x"
        print(
            f"{r['name']:<26} {r['mode']:<7} {r['ok']!s:<5} {r['bytes'] / GB:6.2f} {ts[0]:7.3f} {warm:7.3f} "
            f"{fwarm:11.3f} {r['bound_seconds']:7.3f} {r['bound_seconds'] / warm:5.2f} "
            f"{','.join(f'{x:.1f}' for x in r['stage_gbps']):<10} "
            f"{','.join(f'{x:.1f}' for x in r['restage_gbps']):<12} {mem}{vs}"
        )
        print(f"    stages (last update, per rank): {json.dumps(r['stages'])}")


if __name__ == "__main__":
    sys.exit(main())
