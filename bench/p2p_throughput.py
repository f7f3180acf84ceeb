"""Peer-to-peer catch-up throughput against raw Mooncake throughput, between the same processes.

Holder processes each publish the same version (a Qwen3-8B-shaped tensor table, scaled down by
default) through `P2PEndpoint.publish`. The reader, in this process, alternates for `--repeats`
rounds between:
  raw      one Mooncake batch read of all the bytes as a single entry from one holder
           (`batch_transfer_sync_read`, the engine's own blocking call); the same single read
           submitted asynchronously and polled (`raw-polled`: the engine without its spin-wait);
           and one batch of `--chunk-mib` entries from one holder (`raw-chunked`);
  catch-up what a new pod does: fetch a holder's tensor table, plan chunked reads over every holder,
           `pull()` them with several reads in flight per holder.
Medians are reported; the ratio is catch-up over the best raw variant. The destination is
checked byte for byte after the last catch-up.

CPU (loopback TCP):
    PYTHONPATH=api:engine .venv/bin/python bench/p2p_throughput.py --holders 3 --layers 2
GPU (`--gpu`): holders' buffers and the destination are pinned; each range is copied to
`--device` as soon as it lands (overlapping the network), and the GPU copy is what gets checked.
Full Qwen3-8B shape (15.3 GiB): `--layers 36 --vocab 151936 --gpu --device cuda:1 --holders 1`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
from hotswap_engine import buckets
from hotswap_engine.hostmem import HostBuffer
from hotswap_engine.p2p_plan import TensorEntry, VersionLayout, plan_reads
from hotswap_engine.transport.p2p import P2PEndpoint, PeerSource

GIB = 1 << 30
PATTERN_PIECE = 32 << 20


def qwen3_8b_tensors(layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3-8B's tensor shapes (BF16): hidden 4096, 32 query / 8 kv heads of 128, MLP 12288."""
    hidden, inter, q, kv, head = 4096, 12288, 32 * 128, 8 * 128, 128
    out: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (vocab, hidden)),
        ("model.norm.weight", (hidden,)),
        ("lm_head.weight", (vocab, hidden)),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q)),
            (p + "self_attn.q_norm.weight", (head,)),
            (p + "self_attn.k_norm.weight", (head,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return out


def version_layout(layers: int, vocab: int) -> VersionLayout:
    """The layout staging gives a complete version (`buckets.layout_part`, one part)."""
    shapes = dict(qwen3_8b_tensors(layers, vocab))
    items = [buckets.TensorItem(name, 2 * _numel(shape)) for name, shape in shapes.items()]
    lay = buckets.layout_part(items, 0)
    return VersionLayout.single(
        [TensorEntry(p.name, "BF16", shapes[p.name], p.offset, p.nbytes) for p in lay.placements], lay.nbytes
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


PERIOD = 1048573  # a prime: no chunk or tensor offset is a multiple of it, so misplaced bytes show
_TILE: dict[str, torch.Tensor] = {}


def _tile(device: str) -> torch.Tensor:
    """A pseudo-random block of PERIOD bytes, repeated to cover PERIOD + PATTERN_PIECE bytes."""
    if device not in _TILE:
        g = torch.Generator().manual_seed(1234)
        block = torch.randint(0, 256, (PERIOD,), dtype=torch.uint8, generator=g)
        reps = -(-(PERIOD + PATTERN_PIECE) // PERIOD)
        _TILE[device] = block.repeat(reps).to(device)
    return _TILE[device]


def pattern(start: int, end: int, device: str = "cpu") -> torch.Tensor:
    """Bytes [start, end) (at most PATTERN_PIECE) of the version's content: byte i is tile[i % PERIOD]."""
    s = start % PERIOD
    return _tile(device)[s : s + end - start]


def fill(buf: torch.Tensor) -> None:
    for s in range(0, buf.numel(), PATTERN_PIECE):
        e = min(buf.numel(), s + PATTERN_PIECE)
        buf[s:e].copy_(pattern(s, e))


def holder_main(conn: Connection, layers: int, vocab: int, host: str, pinned: bool) -> None:
    layout = version_layout(layers, vocab)
    buffer = HostBuffer(layout.total_bytes, pinned=pinned)
    fill(buffer.tensor)
    endpoint = P2PEndpoint(host, protocol="tcp")
    source = endpoint.publish("bench", {0: buffer}, layout)
    conn.send_bytes(json.dumps(source.to_dict()).encode())
    conn.recv_bytes()  # until the reader is done


def raw_read(endpoint: P2PEndpoint, source: PeerSource, dest: int, nbytes: int) -> float:
    t0 = time.perf_counter()
    rc = endpoint.engine.batch_transfer_sync_read(
        source.endpoint, [dest], [source.buffers[0].address], [nbytes]
    )
    if rc != 0:
        raise RuntimeError(f"raw read failed: {rc}")
    return time.perf_counter() - t0


def raw_chunked_read(endpoint: P2PEndpoint, source: PeerSource, dest: int, nbytes: int, chunk: int) -> float:
    """The same bytes from one holder as one batch of chunk-sized entries (several connections)."""
    base = source.buffers[0].address
    starts = list(range(0, nbytes, chunk))
    lengths = [min(chunk, nbytes - s) for s in starts]
    t0 = time.perf_counter()
    rc = endpoint.engine.batch_transfer_sync_read(
        source.endpoint, [dest + s for s in starts], [base + s for s in starts], lengths
    )
    if rc != 0:
        raise RuntimeError(f"raw chunked read failed: {rc}")
    return time.perf_counter() - t0


def raw_polled_read(endpoint: P2PEndpoint, source: PeerSource, dest: int, nbytes: int) -> float:
    engine = endpoint.engine
    t0 = time.perf_counter()
    bid = engine.batch_transfer_async_read(source.endpoint, [dest], [source.buffers[0].address], [nbytes])
    while (status := engine.transfer_check_status(bid)) == 0:
        time.sleep(0.0005)
    if status != 1:
        raise RuntimeError(f"raw polled read failed: {status}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--holders", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=2, help="reads in flight per holder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--host", default="127.0.0.1", help="address of every endpoint (never detected)")
    ap.add_argument("--gpu", action="store_true", help="pinned buffers; copy each range to --device")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    layout = version_layout(a.layers, a.vocab)
    total = layout.total_bytes
    print(f"version: {len(layout.tensors)} tensors, {total / GIB:.2f} GiB; {a.holders} holders", flush=True)
    ctx = mp.get_context("spawn")
    procs: list[tuple[Any, Connection]] = []
    for _ in range(a.holders):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=holder_main, args=(child, a.layers, a.vocab, a.host, a.gpu), daemon=True)
        proc.start()
        procs.append((proc, parent))
    try:
        sources = {
            f"h{i}": PeerSource.from_dict(json.loads(c.recv_bytes())) for i, (_, c) in enumerate(procs)
        }
        reader = P2PEndpoint(a.host, protocol="tcp")
        dest = HostBuffer(total, pinned=a.gpu)
        dest_addr, _ = reader.register(dest)
        gpu = torch.empty(total, dtype=torch.uint8, device=a.device) if a.gpu else None
        stream = torch.cuda.Stream(device=a.device) if a.gpu else None
        # Warm-up: first reads of fresh buffers pay page faults on both sides.
        for src in sources.values():
            raw_read(reader, src, dest_addr, total)

        def catch_up() -> tuple[float, float, Any]:
            t0 = time.perf_counter()
            first = next(iter(sources))
            held = reader.fetch_layout(sources[first])
            holders = [reader.holder(name, src, layout, held) for name, src in sources.items()]
            plan = plan_reads(layout, holders, a.chunk_mib << 20)
            t_plan = time.perf_counter() - t0

            def to_gpu(start: int, length: int) -> None:
                assert gpu is not None and stream is not None
                with torch.cuda.stream(stream):
                    gpu[start : start + length].copy_(dest.tensor[start : start + length], non_blocking=True)

            result = reader.pull(plan, dest, sources, parallel=a.parallel, on_range=to_gpu if a.gpu else None)
            if stream is not None:
                stream.synchronize()
            return time.perf_counter() - t0, t_plan, result

        raw_s: list[float] = []
        chunked_s: list[float] = []
        polled_s: list[float] = []
        p2p_s: list[float] = []
        plan_s: list[float] = []
        first_src = next(iter(sources.values()))
        last: Any = None
        for r in range(a.repeats):
            raw_s.append(raw_read(reader, first_src, dest_addr, total))
            polled_s.append(raw_polled_read(reader, first_src, dest_addr, total))
            chunked_s.append(raw_chunked_read(reader, first_src, dest_addr, total, a.chunk_mib << 20))
            dest.tensor.zero_()
            seconds, t_plan, last = catch_up()
            p2p_s.append(seconds)
            plan_s.append(t_plan)
            print(
                f"round {r}: raw {total / raw_s[-1] / GIB:.2f} GiB/s,"
                f" raw-polled {total / polled_s[-1] / GIB:.2f} GiB/s,"
                f" raw-chunked {total / chunked_s[-1] / GIB:.2f} GiB/s,"
                f" catch-up {total / seconds / GIB:.2f} GiB/s (layout+plan {t_plan * 1e3:.0f} ms)",
                flush=True,
            )

        # Byte-exact check of the last catch-up (the GPU copy when there is one): every tensor byte.
        for t in layout.tensors:
            for s in range(t.offset, t.offset + t.nbytes, PATTERN_PIECE):
                e = min(t.offset + t.nbytes, s + PATTERN_PIECE)
                got = gpu[s:e] if gpu is not None else dest.tensor[s:e]
                if not torch.equal(got, pattern(s, e, device=str(got.device))):
                    raise SystemExit(f"byte mismatch in {t.name} at [{s}, {e})")

        raw_rate = total / statistics.median(raw_s) / GIB
        polled_rate = total / statistics.median(polled_s) / GIB
        chunked_rate = total / statistics.median(chunked_s) / GIB
        p2p_rate = total / statistics.median(p2p_s) / GIB
        best_raw = max(raw_rate, polled_rate, chunked_rate)
        out = {
            "bytes": total,
            "holders": a.holders,
            "chunk_mib": a.chunk_mib,
            "parallel": a.parallel,
            "gpu": a.gpu,
            "raw_gib_s": round(raw_rate, 3),
            "raw_polled_gib_s": round(polled_rate, 3),
            "raw_chunked_gib_s": round(chunked_rate, 3),
            "catch_up_gib_s": round(p2p_rate, 3),
            "ratio_vs_raw": round(p2p_rate / raw_rate, 3),
            "ratio_vs_best_raw": round(p2p_rate / best_raw, 3),
            "layout_and_plan_ms": round(statistics.median(plan_s) * 1e3, 1),
            "last_pull": {
                "reads": last.reads,
                "stolen": last.stolen_reads,
                "bytes_by_holder": last.bytes_by_holder,
            },
            "byte_exact": True,
        }
        print(
            f"raw {raw_rate:.2f} GiB/s, raw-polled {polled_rate:.2f} GiB/s,"
            f" raw-chunked {chunked_rate:.2f} GiB/s,"
            f" catch-up {p2p_rate:.2f} GiB/s: {100 * p2p_rate / best_raw:.0f}% of the best raw variant"
            f" ({100 * p2p_rate / raw_rate:.0f}% of raw)",
            flush=True,
        )
        print(json.dumps(out), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        reader.close()
    finally:
        for proc, conn in procs:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"done")
            proc.join(10)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()


if __name__ == "__main__":
    main()
