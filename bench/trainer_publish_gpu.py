"""Issue 11, GPU measurement of the trainer path: `TrainerMemory.hold` of a Qwen3-8B-shaped state dict
that lives on the GPU (copy into the pinned slot + fingerprints on the GPU), then an agent's staging of
it (`stage_from_trainer`: table reads, one-sided Mooncake TCP reads over loopback, fingerprint check
on the host), for the whole version and for part 0 of 2. Several rounds: the first pays the slot's
allocation and pinning, later ones reuse it (the SDK's steady state).

    PYTHONPATH=$PWD/api:$PWD/engine:$PWD/sdk python3 bench/trainer_publish_gpu.py --out $OUT/trainer

Prints one JSON line per round and writes them to <out>/results.json. No apiserver is involved
(the WeightVersion's creation is a single small API call).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hotswap_api import protocol
from hotswap_engine.hostmem import HostBufferPool
from hotswap_engine.transport.p2p import P2PEndpoint
from hotswap_engine.transport.trainer_source import stage_from_trainer
from hotswap_trainer.memory import DTYPE_NAMES, TrainerMemory


def qwen3_8b_like(device: str, layers: int, vocab: int) -> dict[str, torch.Tensor]:
    h, inter, kv = 4096, 12288, 1024
    sd = {"model.embed_tokens.weight": torch.empty(vocab, h), "lm_head.weight": torch.empty(vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": torch.empty(h, h),
            p + "self_attn.k_proj.weight": torch.empty(kv, h),
            p + "self_attn.v_proj.weight": torch.empty(kv, h),
            p + "self_attn.o_proj.weight": torch.empty(h, h),
            p + "mlp.gate_proj.weight": torch.empty(inter, h),
            p + "mlp.up_proj.weight": torch.empty(inter, h),
            p + "mlp.down_proj.weight": torch.empty(h, inter),
            p + "input_layernorm.weight": torch.empty(h),
        }
    return {n: t.to(torch.bfloat16).normal_().to(device) for n, t in sd.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936, help="smaller for a quick CPU run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = qwen3_8b_like(device, args.layers, args.vocab)
    nbytes = sum(t.numel() * t.element_size() for t in model.values())
    expected = [
        protocol.TensorSpec(name=n, dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape))
        for n, t in model.items()
    ]
    mem = TrainerMemory("127.0.0.1", max_slots=2)
    reader = P2PEndpoint("127.0.0.1")
    pool = HostBufferPool(pinned=False)
    rows = []
    for r in range(args.rounds):
        for t in model.values():
            t.add_(1)  # a training step changed the weights
        torch.cuda.synchronize() if device == "cuda" else None
        version = f"s{r}"
        t0 = time.perf_counter()
        held = mem.hold(version, model.items())
        hold_s = time.perf_counter() - t0
        source = protocol.TrainerSource(
            parts=(held.part,), tensors=held.tensors, checksum=protocol.trainer_checksum(held.tensors)
        )
        row = {
            "round": r,
            "device": device,
            "bytes": nbytes,
            "hold_s": round(hold_s, 3),
            "allocations": mem.allocations,
        }
        for label, part in (("whole", None), ("part0of2", protocol.PartSpec(index=0, count=2))):
            t1 = time.perf_counter()
            staged = stage_from_trainer(reader, source, part, expected, pool=pool)
            row[f"stage_{label}_s"] = round(time.perf_counter() - t1, 3)
            row[f"stage_{label}_bytes"] = staged.nbytes
            staged.release()
        if r:
            mem.release(f"s{r - 1}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    mem.close()
    reader.close()


if __name__ == "__main__":
    main()
