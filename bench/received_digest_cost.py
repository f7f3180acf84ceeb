"""Cost of fleet verification level (a): fingerprinting every tensor a vLLM worker receives (#12).

The transfer engine fingerprints each whole tensor as it comes off the hand-off (`/apply` with
"digests": true). This measures that work alone, on tensors shaped like a checkpoint's, against the
copy every received byte already costs on that device (the hand-off's copy out of its slot), so the
fraction carries over to an update of any size:

    python bench/received_digest_cost.py --device cpu --mib 256
    python bench/received_digest_cost.py --device cuda --mib 8192     # one GPU

Prints `RECEIVED_DIGEST_COST {json}`: bytes, seconds per pass (median of --repeat) of the
fingerprints and of the copy, GB/s of each and fingerprint/copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from hotswap_engine.digest import fingerprint


def checkpoint_like(total_bytes: int, device: torch.device) -> list[torch.Tensor]:
    """bf16 matrices of a decoder's proportions (hidden h: attention h×h, MLP h×3h) up to the size."""
    hidden = 1024 if total_bytes < (1 << 30) else 4096
    shapes = [(hidden, hidden)] * 4 + [(3 * hidden, hidden)] * 3 + [(hidden,)] * 2
    out: list[torch.Tensor] = []
    size = 0
    gen = torch.Generator(device=device).manual_seed(0)
    while size < total_bytes:
        for shape in shapes:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
            out.append(t)
            size += t.numel() * 2
    return out


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    tensors = checkpoint_like(args.mib << 20, device)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    fingerprint(tensors[0])  # warm-up (CUDA kernels, allocator)
    digest_s = timed(lambda: [fingerprint(t) for t in tensors], device, args.repeat)
    copy_s = timed(lambda: [t.clone() for t in tensors], device, args.repeat)
    result = {
        "device": str(device),
        "bytes": nbytes,
        "tensors": len(tensors),
        "fingerprint_s": round(digest_s, 4),
        "copy_s": round(copy_s, 4),
        "fingerprint_GBps": round(nbytes / digest_s / 1e9, 2),
        "copy_GBps": round(nbytes / copy_s / 1e9, 2),
        "fingerprint_over_copy": round(digest_s / copy_s, 2),
    }
    print("RECEIVED_DIGEST_COST " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
