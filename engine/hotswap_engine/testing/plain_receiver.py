"""A stand-in for a vLLM worker: a process that owns preallocated parameters on one device and fills
them from the hand-off, chunk by chunk, then checks them byte for byte against a checkpoint.

What the GPU machine runs instead of vLLM (it has none), and what CPU tests run beside the
broadcast members. The copy path is the one a worker extension uses: `HandoffReceiver.slices()`,
each entry copied into its parameter at `tensor_offset` (on the current CUDA stream for GPU slots).

    python -m hotswap_engine.testing.plain_receiver --endpoint E --rank 0 --device cuda:0 \
        --base CKPT --updates 2 --verify CKPT_V1 --verify CKPT_V2 --out result.jsonl

Every update appends one JSON line to `--out`: version, seconds, bytes, and `ok`/`mismatched`.
Before each update the parameters are filled with a poison byte, so a chunk that never arrives
cannot pass the check by leftover data. Exit status 0 only if every update arrived and matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hotswap_engine.handoff import HandoffReceiver
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


def receive(rx: HandoffReceiver, params: dict[str, torch.Tensor]) -> tuple[str, int, set[str]]:
    """One update: copy every entry into its parameter; returns (version, bytes, names touched)."""
    version = rx.wait_begin()
    total = 0
    touched: set[str] = set()
    for entry, view in rx.slices():
        target = params.get(entry.name)
        if target is None:
            raise KeyError(f"unknown tensor {entry.name}")
        dst = flat_bytes(target)
        if dst.numel() != entry.tensor_nbytes:
            raise ValueError(f"{entry.name}: {entry.tensor_nbytes} bytes sent, parameter has {dst.numel()}")
        dst[entry.tensor_offset : entry.tensor_offset + entry.nbytes].copy_(view, non_blocking=True)
        total += entry.nbytes
        touched.add(entry.name)
    if view_device_is_cuda(params):
        torch.cuda.synchronize()
    return version, total, touched


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
    # Expected bytes are loaded before the first update, so checking never delays the next one.
    expected_cache = {path: load_expected(path, device) for path in dict.fromkeys(args.verify)}
    if device.type == "cuda":
        # What the hand-off costs this process beyond its parameters (and the reference bytes).
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    ok = True
    for n in range(args.updates):
        for t in params.values():
            flat_bytes(t).fill_(POISON)
        record: dict[str, object] = {"update": n, "rank": args.rank}
        try:
            with HandoffReceiver(args.endpoint, args.rank, device, timeout=args.timeout) as rx:
                t0 = time.perf_counter()
                try:
                    version, nbytes, touched = receive(rx, params)
                except Exception as e:
                    rx.fail(f"{type(e).__name__}: {e}")
                    raise
                record.update(version=version, bytes=nbytes, seconds=time.perf_counter() - t0)
                if device.type == "cuda":
                    record["gpu_extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - baseline
                missing = sorted(set(params) - touched)
                if missing:
                    raise ValueError(f"no bytes arrived for {missing[:10]}")
                rx.done()
            if n < len(args.verify):
                mismatched = verify(params, expected_cache[args.verify[n]])
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
