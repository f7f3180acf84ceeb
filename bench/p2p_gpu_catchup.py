"""Issue 5, GPU item: catch-up of a Qwen3-8B-shaped checkpoint from one GPU process's pinned host
memory into the other GPU, over Mooncake, timed and verified byte for byte.

Run on the device tool's nvidia-h200-x2 from the repository root (wheels carried in `.whl/`,
mooncake-transfer-engine-non-cuda among them):

    PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine:$PWD/testing python3 bench/p2p_gpu_catchup.py --out $OUT/p2p

What runs, all through the project's own code:
  * process A ("holder", CUDA device 0): `staging.stage` of the whole checkpoint (page-cached
    safetensors in /dev/shm) into one pinned host buffer, then `P2PEndpoint.publish` of it with its
    tensor table (`staged_layout`);
  * process B ("reader", this process, CUDA device 1): a pinned destination buffer registered with
    its own `P2PEndpoint`; per round, raw Mooncake reads of the same bytes from A (one single-entry
    batch, and one batch of `--chunk-mib` entries), then the catch-up as the agent does it:
    `fetch_layout`, `holder`, `p2p_plan.plan_reads`, `pull` with `on_range` starting the host→GPU
    copy of every range as soon as it landed (pipelined), and the GPU copy awaited; then the same
    host→GPU copy of the whole buffer alone (what the copy costs without overlap).
After the last round the GPU bytes are compared with the checkpoint's files, every tensor byte.

Transport: Mooncake's `tcp` protocol on 127.0.0.1 (the machine has no RDMA NICs, so `rdma`, the
production setting, cannot run here); both processes on one host, so this measures Mooncake's
TCP path through loopback, not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engine"))
sys.path.insert(0, str(REPO / "testing"))
sys.path.insert(0, str(REPO / "bench"))

GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def holder_main(conn: Connection, ckpt: str, host: str, device: int) -> None:
    from hotswap_engine.staging import stage
    from hotswap_engine.transport.p2p import P2PEndpoint, staged_layout

    if device >= 0:
        torch.cuda.set_device(device)
    t = time.perf_counter()
    # Pinned where CUDA is usable (the GPU run); `--smoke` runs the same code on CPU.
    staged = stage(Path(ckpt), None, [Path(ckpt).parent], None, pinned=device >= 0)
    stage_s = time.perf_counter() - t
    endpoint = P2PEndpoint(host, protocol="tcp")
    source = endpoint.publish("v1", staged.segments, staged_layout(staged))
    conn.send_bytes(
        json.dumps(
            {
                "source": source.to_dict(),
                "stage_seconds": stage_s,
                "stage_timings": staged.timings,
                "bytes": staged.nbytes,
                "pinned": all(b.is_pinned for b in staged.segments.values()),
            }
        ).encode()
    )
    conn.recv_bytes()  # until the reader is done
    endpoint.close()
    staged.release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, help="default: write a Qwen3-8B-shaped one to --workdir")
    ap.add_argument("--workdir", type=Path, default=Path("/dev/shm/hs-p2p"))
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--host", default="127.0.0.1", help="address of both endpoints (never detected)")
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4, help="reads in flight per holder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--holder-device", type=int, default=0)
    ap.add_argument("--reader-device", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="CPU only, a small checkpoint (checks the harness)")
    args = ap.parse_args()

    from hotswap_engine.hostmem import HostBuffer
    from hotswap_engine.p2p_plan import plan_reads
    from hotswap_engine.transport.p2p import P2PEndpoint, PeerSource
    from hotswap_testing.checkpoints import block_filler, nbytes_of, save_sharded
    from hotswap_testing.plain_receiver import FileReference

    shape_defs = importlib.import_module("update_speed").shape_defs

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint
    if args.smoke:
        args.holder_device = args.reader_device = -1
    if ckpt is None:
        defs = shape_defs(args.shape)
        if args.smoke:
            from hotswap_testing.checkpoints import qwen3_defs

            defs = qwen3_defs(
                layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=1000
            )
        ckpt = args.workdir / args.shape
        t = time.perf_counter()
        save_sharded(ckpt, defs, block_filler(seed=11), shards=4)
        log(
            f"wrote {sum(nbytes_of(d, s) for _, d, s in defs) / GB:.2f} GB to {ckpt} "
            f"in {time.perf_counter() - t:.1f}s"
        )
    device = torch.device("cuda", args.reader_device) if args.reader_device >= 0 else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=holder_main, args=(child, str(ckpt), args.host, args.holder_device), daemon=True
    )
    proc.start()
    result: dict[str, Any] = {"shape": args.shape, "protocol": "tcp", "host": args.host}
    try:
        info = json.loads(parent.recv_bytes())
        source = PeerSource.from_dict(info["source"])
        sources = {"A": source}
        result["holder"] = {k: info[k] for k in ("stage_seconds", "stage_timings", "bytes", "pinned")}
        log(
            f"holder staged {info['bytes'] / GB:.2f} GB in {info['stage_seconds']:.2f}s, "
            f"published at {source.endpoint}"
        )

        reader = P2PEndpoint(args.host, protocol="tcp")
        layout = reader.fetch_layout(source)
        total = layout.total_bytes
        dest = HostBuffer(total, pinned=cuda, defer_pin=True)
        dest.populate()
        dest.pin()
        dest_addr, _ = reader.register(dest)
        gpu = torch.empty(total, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device) if cuda else None
        remote = source.buffer(0)
        engine = reader.engine

        def raw(chunk: int) -> float:
            starts = list(range(0, total, chunk))
            t0 = time.perf_counter()
            rc = engine.batch_transfer_sync_read(
                source.endpoint,
                [dest_addr + s for s in starts],
                [remote.address + s for s in starts],
                [min(chunk, total - s) for s in starts],
            )
            if rc != 0:
                raise RuntimeError(f"raw read failed: {rc}")
            return time.perf_counter() - t0

        def sync() -> None:
            if stream is not None:
                stream.synchronize()

        raw(total)  # warm-up: connections, first touches
        rounds: list[dict[str, float]] = []
        last: Any = None
        for r in range(args.repeats):
            row: dict[str, float] = {"raw_single_s": raw(total), "raw_chunked_s": raw(args.chunk_mib << 20)}
            dest.tensor.zero_()
            gpu.zero_()
            sync()
            t0 = time.perf_counter()
            held = reader.fetch_layout(source)
            holder = reader.holder("A", source, held, held)
            plan = plan_reads(held, [holder], args.chunk_mib << 20)
            t_plan = time.perf_counter()

            def to_gpu(start: int, length: int) -> None:
                with torch.cuda.stream(stream):  # None (CPU smoke run): a plain copy
                    gpu[start : start + length].copy_(dest.tensor[start : start + length], non_blocking=True)

            last = reader.pull(plan, dest, sources, parallel=args.parallel, on_range=to_gpu)
            t_pull = time.perf_counter()
            sync()
            t_done = time.perf_counter()
            row.update(
                plan_s=t_plan - t0, pull_s=t_pull - t0, h2d_tail_s=t_done - t_pull, total_s=t_done - t0
            )
            t1 = time.perf_counter()
            with torch.cuda.stream(stream):
                gpu.copy_(dest.tensor, non_blocking=True)
            sync()
            row["h2d_alone_s"] = time.perf_counter() - t1
            rounds.append(row)
            log(
                f"round {r}: raw {total / row['raw_single_s'] / GB:.2f} GB/s, raw chunked "
                f"{total / row['raw_chunked_s'] / GB:.2f} GB/s, catch-up pull {row['pull_s']:.2f}s "
                f"({total / row['pull_s'] / GB:.2f} GB/s), to GPU done {row['total_s']:.2f}s "
                f"(tail {row['h2d_tail_s'] * 1e3:.0f} ms), H2D alone {row['h2d_alone_s']:.3f}s"
            )
        # Every tensor byte on the GPU against the checkpoint files (not against the holder).
        t = time.perf_counter()
        views = {t_.name: gpu[t_.offset : t_.offset + t_.nbytes] for t_ in layout.tensors}
        bad = FileReference(ckpt, device).mismatched(views)
        verify_s = time.perf_counter() - t

        def med(key: str) -> float:
            return statistics.median(x[key] for x in rounds)

        result.update(
            bytes=total,
            tensors=len(layout.tensors),
            chunk_mib=args.chunk_mib,
            parallel=args.parallel,
            rounds=rounds,
            raw_single_gbps=round(total / med("raw_single_s") / GB, 3),
            raw_chunked_gbps=round(total / med("raw_chunked_s") / GB, 3),
            pull_seconds=round(med("pull_s"), 3),
            pull_gbps=round(total / med("pull_s") / GB, 3),
            h2d_tail_seconds=round(med("h2d_tail_s"), 4),
            total_seconds=round(med("total_s"), 3),
            h2d_alone_seconds=round(med("h2d_alone_s"), 4),
            h2d_alone_gbps=round(total / med("h2d_alone_s") / GB, 1),
            ratio_vs_best_raw=round(min(med("raw_single_s"), med("raw_chunked_s")) / med("pull_s"), 3),
            last_pull={"reads": last.reads, "bytes_by_holder": last.bytes_by_holder},
            byte_exact=not bad,
            mismatched=bad[:20],
            verify_seconds=round(verify_s, 2),
        )
        log(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
        (args.out / "p2p_gpu_catchup.json").write_text(json.dumps(result, indent=1))
        reader.close()
        return 0 if not bad else 1
    finally:
        with contextlib.suppress(OSError):
            parent.send_bytes(b"done")
        proc.join(30)
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()


if __name__ == "__main__":
    sys.exit(main())
