"""A stand-in for a vLLM worker: a process that owns preallocated parameters on one device and fills
them from the hand-off, chunk by chunk, then checks them byte for byte against a checkpoint.

What the GPU machine runs instead of vLLM (it has none), and what CPU tests run beside the
broadcast members. The copy path is the one a worker extension uses: `HandoffReceiver.slices()`,
each entry copied into its parameter at `tensor_offset` (on the current CUDA stream for GPU slots).

    python -m hotswap_testing.plain_receiver --endpoint E --rank 0 --device cuda:0 \
        --base CKPT --updates 2 --verify CKPT_V1 --verify CKPT_V2 --out result.jsonl

Every update appends one JSON line to `--out`: version, seconds, bytes, and `ok`/`mismatched`.
Before each update the parameters are filled with a poison byte, so a chunk that never arrives
cannot pass the check by leftover data. Exit status 0 only if every update arrived and matched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hotswap_engine.handoff import HandoffReceiver
from hotswap_engine.hostmem import HostBuffer
from hotswap_engine.staging import TORCH_DTYPES, read_index, stage

POISON = 0xA5


def allocate(base: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Parameters shaped like the base checkpoint's tensors (its headers only are read)."""
    params = {}
    for loc in read_index(base):
        params[loc.spec.name] = torch.empty(loc.spec.shape, dtype=TORCH_DTYPES[loc.spec.dtype], device=device)
    return params


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)


def receive(
    rx: HandoffReceiver,
    params: dict[str, torch.Tensor],
    timeline: list[list[float]] | None = None,
    stamps: dict[str, float] | None = None,
) -> tuple[str, int, set[str]]:
    """One update: copy every entry into its parameter; returns (version, bytes, names touched).
    With `timeline` (CUDA), appends per bucket [host ms of its first entry from the first bucket,
    device ms of its copies] (a bucket = consecutive entries in one slot)."""
    version = rx.wait_begin()
    stamps = {} if stamps is None else stamps
    total = 0
    touched: set[str] = set()
    cuda = view_device_is_cuda(params)
    marks: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []
    current = -1
    t0 = 0.0
    start_ev: torch.cuda.Event | None = None
    last_entry_wall = 0.0
    for entry, view in rx.slices():
        last_entry_wall = time.time()
        if timeline is not None and cuda:
            base = view.untyped_storage().data_ptr()
            if base != current:  # a new bucket (consecutive buckets never share a slot)
                now = time.perf_counter()
                if start_ev is None:
                    t0 = now
                start_ev = _mark()
                marks.append((now - t0, start_ev, start_ev))
                current = base
        target = params.get(entry.name)
        if target is None:
            raise KeyError(f"unknown tensor {entry.name}")
        dst = flat_bytes(target)
        if dst.numel() != entry.tensor_nbytes:
            raise ValueError(f"{entry.name}: {entry.tensor_nbytes} bytes sent, parameter has {dst.numel()}")
        dst[entry.tensor_offset : entry.tensor_offset + entry.nbytes].copy_(view, non_blocking=True)
        if marks and start_ev is not None:
            marks[-1] = (marks[-1][0], start_ev, _mark())  # after this entry's copy
        total += entry.nbytes
        touched.add(entry.name)
    if timeline is not None:
        stamps["last_entry_wall"] = last_entry_wall
        stamps["end_received_wall"] = time.time()
    if cuda:
        torch.cuda.synchronize()
    if timeline is not None:
        timeline.extend([round(t * 1e3, 3), round(a.elapsed_time(b), 4)] for t, a, b in marks)
    return version, total, touched


def _mark() -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def view_device_is_cuda(params: dict[str, torch.Tensor]) -> bool:
    return any(t.is_cuda for t in params.values())


def load_expected(checkpoint: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as flat bytes on `device` (loaded once, compared after each update)."""
    root = checkpoint.resolve().parent if checkpoint.is_file() else checkpoint
    staged = stage(checkpoint, None, [root], None, pinned=False)
    try:
        return {name: staged.raw(name).to(device, copy=True) for name in staged.tensors}
    finally:
        staged.release()


class FileReference:
    """A checkpoint's bytes compared with parameters straight from its files (page cache), through
    reusable scratch buffers (pinned host, and one on the device): no second copy of the model
    anywhere, so a 65 GB model can be checked on one GPU beside its parameters. Byte for byte:
    each piece is read from the file, copied to the device and compared with `torch.equal`."""

    def __init__(self, checkpoint: Path, device: torch.device, batch: int = 512 << 20, piece: int = 64 << 20):
        self.locations = read_index(checkpoint)
        self.device = device
        self.batch = batch
        self.piece = piece
        cuda = device.type == "cuda"
        self.host = [HostBuffer(batch, pinned=cuda) for _ in range(2)]
        self.dev = torch.empty(batch, dtype=torch.uint8, device=device) if cuda else None
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="verify-read")

    def _batches(self) -> list[list[tuple[str, Path, int, int, int, int]]]:
        """(name, file, file offset, tensor offset, bytes, batch offset) pieces grouped per batch."""
        out: list[list[tuple[str, Path, int, int, int, int]]] = [[]]
        used = 0
        for loc in self.locations:
            for off in range(0, loc.nbytes, self.piece):
                n = min(self.piece, loc.nbytes - off)
                if used + n > self.batch:
                    out.append([])
                    used = 0
                out[-1].append((loc.spec.name, loc.file, loc.start + off, off, n, used))
                used += n
        return out

    def _read(self, batch: list[tuple[str, Path, int, int, int, int]], host: HostBuffer) -> None:
        view = host.view

        def one(p: tuple[str, Path, int, int, int, int]) -> None:
            _, file, file_off, _, n, at = p
            fd = os.open(file, os.O_RDONLY)
            try:
                got = 0
                while got < n:
                    step = os.preadv(fd, [view[at + got : at + n]], file_off + got)
                    if step <= 0:
                        raise OSError(f"{file}: short read")
                    got += step
            finally:
                os.close(fd)

        list(self.pool.map(one, batch))

    def mismatched(self, params: dict[str, torch.Tensor]) -> list[str]:
        names = {loc.spec.name for loc in self.locations}
        bad = set(params) ^ names
        batches = self._batches()
        future = self.pool.submit(self._read, batches[0], self.host[0])
        for i, batch in enumerate(batches):
            future.result()
            host = self.host[i % 2]
            if i + 1 < len(batches):  # read the next batch while this one is compared
                future = self.pool.submit(self._read, batches[i + 1], self.host[(i + 1) % 2])
            used = max((p[5] + p[4] for p in batch), default=0)
            if self.dev is not None:
                ref = self.dev[:used]
                ref.copy_(host.tensor[:used])
            else:
                ref = host.tensor[:used]
            for name, _, _, toff, n, at in batch:
                if name in bad or name not in params:
                    continue
                if not torch.equal(flat_bytes(params[name])[toff : toff + n], ref[at : at + n]):
                    bad.add(name)
            if self.dev is not None:
                torch.cuda.synchronize(self.device)  # before the next batch overwrites the scratch
        return sorted(bad)


def verify(params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Names whose bytes differ from `expected` (compared on the parameters' device)."""
    bad = sorted(set(params) ^ set(expected))
    bad += [n for n, p in params.items() if n in expected and not torch.equal(flat_bytes(p), expected[n])]
    return sorted(bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", type=Path, required=True, help="checkpoint whose headers shape the parameters")
    ap.add_argument("--updates", type=int, default=1)
    ap.add_argument("--verify", type=Path, action="append", default=[], help="expected checkpoint per update")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    params = allocate(args.base, device)
    # CPU: expected bytes are loaded before the first update. GPU: compared straight from the
    # files after each update (a second copy of a 32B model would not fit beside it).
    expected_cache = (
        {path: load_expected(path, device) for path in dict.fromkeys(args.verify)}
        if device.type != "cuda"
        else {}
    )
    references = (
        {path: FileReference(path, device) for path in dict.fromkeys(args.verify)}
        if device.type == "cuda"
        else {}
    )
    gc.freeze()  # what vLLM does after start-up: its start-up objects are never scanned again
    if device.type == "cuda":
        # What the hand-off costs this process beyond its parameters (and the reference bytes).
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    ok = True
    for n in range(args.updates):
        for t in params.values():
            flat_bytes(t).fill_(POISON)
        record: dict[str, object] = {"update": n, "rank": args.rank}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)  # the last check's scratch is not the hand-off's
        timeline: list[list[float]] = []
        stamps: dict[str, float] = {}
        try:
            with HandoffReceiver(args.endpoint, args.rank, device, timeout=args.timeout) as rx:
                t0 = time.perf_counter()
                try:
                    version, nbytes, touched = receive(rx, params, timeline, stamps)
                except Exception as e:
                    rx.fail(f"{type(e).__name__}: {e}")
                    raise
                record.update(version=version, bytes=nbytes, seconds=time.perf_counter() - t0)
                record["end_wall"] = time.time()
                if timeline:
                    record["apply_device_seconds"] = sum(x[1] for x in timeline) / 1e3
                    record["timeline"] = timeline
                if device.type == "cuda":
                    record["gpu_extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
                missing = sorted(set(params) - touched)
                if missing:
                    raise ValueError(f"no bytes arrived for {missing[:10]}")
                rx.done()
                record.update(stamps, done_sent_wall=time.time())
            if n < len(args.verify):
                t1 = time.perf_counter()
                if device.type == "cuda":
                    mismatched = references[args.verify[n]].mismatched(params)
                else:
                    mismatched = verify(params, expected_cache[args.verify[n]])
                record["verify_seconds"] = time.perf_counter() - t1
                record.update(ok=not mismatched, mismatched=mismatched[:20])
                ok = ok and not mismatched
            else:
                record["ok"] = True
        except Exception as e:
            record.update(ok=False, error=f"{type(e).__name__}: {e}")
            ok = False
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if not record["ok"]:
            break
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
