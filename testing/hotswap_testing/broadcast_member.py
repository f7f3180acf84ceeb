"""One broadcast member without the agent's HTTP layer: stage a part, join the group, run updates.

Used by the CPU tests (gloo, shared-memory slots) and the GPU check (NCCL, CUDA IPC slots), each
member beside its own `plain_receiver` process(es):

    python -m hotswap_testing.broadcast_member --rank 0 --members a,b \
        --master-addr 127.0.0.1 --master-port 29500 --bind-host 127.0.0.1 --device cpu \
        --base CKPT --checkpoint CKPT_V1 --checkpoint CKPT_V2 --endpoint tcp://127.0.0.1:5555 \
        --out member0.json

Each `--checkpoint` is one update (same group, kept across updates). The member checks after every
update that its full-version host buffers equal the checkpoint byte for byte, and writes stats
(stage and transfer timings) as JSON. `--pause-after-bytes` makes it stop mid-update (for tests
that kill a member there); it prints `PAUSED` and sleeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hotswap_api.protocol import DEFAULT_MEMORY_BUDGET_BYTES, PartSpec
from hotswap_engine.handoff import HandoffSender
from hotswap_engine.hostmem import HostBuffer, HostBufferPool
from hotswap_engine.staging import StagedCheckpoint, read_index, stage
from hotswap_engine.transport.broadcast import (
    BroadcastTransport,
    allocate_full_version,
    complete_version,
    make_plan,
    run_broadcast,
)
from hotswap_engine.transport.process_group import GroupCache, GroupSpec


def check_full(full: StagedCheckpoint, checkpoint: Path, piece: int = 64 << 20) -> list[str]:
    """Names whose bytes in `full` differ from the checkpoint's files (streamed: no second copy)."""
    locations = {loc.spec.name: loc for loc in read_index(checkpoint)}
    bad = sorted(set(full.tensors) ^ set(locations))
    fds = {f: os.open(f, os.O_RDONLY) for f in {loc.file for loc in locations.values()}}
    local = threading.local()

    def differs(name: str) -> bool:
        if not hasattr(local, "window"):
            local.scratch = bytearray(piece)
            local.window = torch.frombuffer(local.scratch, dtype=torch.uint8)
        view = memoryview(local.scratch)
        loc = locations[name]
        raw = full.raw(name)
        for start in range(0, loc.nbytes, piece):
            n = min(piece, loc.nbytes - start)
            got = os.preadv(fds[loc.file], [view[:n]], loc.start + start)
            if got != n or not torch.equal(local.window[:n], raw[start : start + n]):
                return True
        return False

    names = [name for name in locations if name in full.tensors]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            bad += [name for name, d in zip(names, pool.map(differs, names), strict=True) if d]
    finally:
        for fd in fds.values():
            os.close(fd)
    return sorted(bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--members", required=True, help="comma-separated pod names by rank")
    ap.add_argument("--master-addr", required=True)
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--bind-host", required=True, help="this member's own address for gloo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--base", type=Path, required=True, help="the served model's checkpoint (expected headers)"
    )
    ap.add_argument("--checkpoint", type=Path, action="append", required=True, help="one per update")
    ap.add_argument("--endpoint", required=True, help="hand-off endpoint this member binds")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET_BYTES)
    ap.add_argument("--bucket-bytes", type=int, default=0, help="fix the bucket size (0: from the budget)")
    ap.add_argument("--slots", type=int, default=4, help="slot count with --bucket-bytes")
    ap.add_argument("--op-timeout", type=float, default=60.0)
    ap.add_argument("--shm-dir", default="/dev/shm", help="where CPU slots live (tests use their own)")
    ap.add_argument(
        "--no-full", action="store_true", help="skip the full-version host copy (to time its cost)"
    )
    ap.add_argument(
        "--trail-full",
        action="store_true",
        help="fill the full-version buffers in a trailing pass after the workers' done",
    )
    ap.add_argument(
        "--no-warm-up", action="store_true", help="skip the NCCL warm-up when the group is formed"
    )
    ap.add_argument(
        "--stage-again",
        action="store_true",
        help="after the first stage, release it to a buffer pool and stage again (reused pinned buffer)",
    )
    ap.add_argument("--timeline", action="store_true", help="record the per-bucket timeline of every update")
    ap.add_argument("--pause-after-bytes", type=int, default=-1)
    ap.add_argument("--verify", choices=["all", "last", "none"], default="all", help="which updates to check")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    members = tuple(args.members.split(","))
    world = len(members)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    spec = GroupSpec(members, args.master_addr, args.master_port, "nccl" if device.type == "cuda" else "gloo")
    expected = [loc.spec for loc in read_index(args.base)]
    part = PartSpec(index=args.rank, count=world)
    member_parts: dict[int, tuple[int, int] | None] = {r: (r, world) for r in range(world)}
    cache = GroupCache()
    pool = HostBufferPool(pinned=device.type == "cuda")
    transport = BroadcastTransport(device, args.shm_dir)
    sender = HandoffSender(args.endpoint, args.workers, timeout=args.op_timeout)
    results: list[dict[str, object]] = []
    ok = True
    staged: StagedCheckpoint | None = None
    staged_from: Path | None = None
    full_out: dict[int, HostBuffer] = {}
    try:
        for n, checkpoint in enumerate(args.checkpoint):
            record: dict[str, object] = {"update": n, "rank": args.rank}
            if staged is None or staged_from != checkpoint:  # the same checkpoint again: keep it staged
                if staged is not None:
                    staged.release()
                t0 = time.perf_counter()
                staged = stage(checkpoint, part, [checkpoint.parent], expected, pool=pool)
                staged_from = checkpoint
                record["stage_seconds"] = time.perf_counter() - t0
                record["stage_timings"] = staged.timings
                if args.stage_again and n == 0:  # the next version's staging: a reused pinned buffer
                    staged.release()
                    t0 = time.perf_counter()
                    staged = stage(checkpoint, part, [checkpoint.parent], expected, pool=pool)
                    record["restage_seconds"] = time.perf_counter() - t0
                    record["restage_timings"] = staged.timings
                    record["restage_reused"] = pool.reused
            record["staged_bytes"] = staged.nbytes
            t1 = time.perf_counter()
            group = cache.get(
                spec, args.rank, bind_host=args.bind_host, device=device, timeout=args.op_timeout
            )
            record["connect_seconds"] = time.perf_counter() - t1
            fixed = (args.bucket_bytes, args.slots) if args.bucket_bytes else None
            plan, layout = make_plan(staged, args.memory_budget, fixed=fixed)
            if not args.no_warm_up:  # where the agent forms its group: NCCL's set-up paid here
                record["warm_up_seconds"] = transport.warm_up(group, layout.bucket_bytes, slots=layout.slots)
            if args.no_full:
                full_out = {}
            elif {p: b.nbytes for p, b in full_out.items()} != {
                p.part: p.nbytes for p in plan.parts if p.part not in staged.segments
            }:
                full_out = allocate_full_version(staged, plan)
            for b in full_out.values():
                b.tensor.fill_(0xA5)  # poison: a bucket that never arrives cannot pass the check
            record.update(bucket_bytes=layout.bucket_bytes, slots=layout.slots, buckets=len(plan.buckets))

            def progress(done: int) -> None:
                if 0 <= args.pause_after_bytes <= done:
                    print("PAUSED", flush=True)
                    time.sleep(3600)

            try:
                # Workers connected and slots handed over before the clock starts (the plain
                # receivers load their reference bytes first); then start together.
                sender.begin(
                    f"v{n}", transport.slots(layout.slots, layout.bucket_bytes), timeout=args.op_timeout
                )
                group.barrier()
                t2 = time.perf_counter()
                stats = run_broadcast(
                    group,
                    staged,
                    plan,
                    layout,
                    member_parts,
                    sender,
                    f"v{n}",
                    transport,
                    full_out=full_out,
                    progress=progress,
                    op_timeout=args.op_timeout,
                    begin=False,
                    trail_full=args.trail_full,
                )
                elapsed = time.perf_counter() - t2
                record["update_seconds"] = elapsed
                record["start_wall"] = time.time() - elapsed
            except Exception as e:
                record["failed_at"] = time.time()  # wall clock, for tests measuring detection time
                sender.abort(f"{type(e).__name__}: {e}")
                cache.discard()
                record.update(ok=False, error=f"{type(e).__name__}: {e}")
                results.append(record)
                ok = False
                break
            record["stats"] = stats.as_dict()
            # Until the workers' done (with --trail-full the full version completes later).
            record["handoff_seconds"] = stats.handoff_seconds
            if args.timeline or n == len(args.checkpoint) - 1:
                record["timeline"] = stats.timeline
                record["trail_timeline"] = stats.trail_timeline
            if device.type == "cuda":  # slots and staging scratch (NCCL's own buffers not included)
                record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            full = complete_version(staged, full_out)
            if args.no_full:
                record.update(ok=True, verified=False)
            elif args.verify == "all" or (args.verify == "last" and n == len(args.checkpoint) - 1):
                t3 = time.perf_counter()
                bad = check_full(full, checkpoint)
                record.update(ok=not bad and full.complete, mismatched=bad[:20], verified=True)
                record["verify_seconds"] = time.perf_counter() - t3
                ok = ok and not bad and full.complete
            else:
                record.update(ok=True, verified=False)
            results.append(record)
            print(json.dumps(record), flush=True)
    finally:
        sender.close()
        transport.close()
        cache.discard()
        args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        if not r.get("ok"):
            print(json.dumps(r), flush=True)
    if not ok and device.type == "cuda":
        # After a failed NCCL collective the CUDA context may hold a kernel that never finishes;
        # interpreter teardown would wait on it. A rank worker exits instead (the agent restarts it).
        sys.stdout.flush()
        os._exit(1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
