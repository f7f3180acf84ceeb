"""Synthetic safetensors checkpoints for tests and benchmarks, written tensor by tensor.

The writer streams each tensor's bytes straight to the file (no whole-checkpoint copy in memory),
so the GPU check can write a Qwen3-8B-sized checkpoint quickly; `save_sharded` adds the
`model.safetensors.index.json` that Hugging Face checkpoints carry.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from hotswap_engine.staging import DTYPE_SIZES, INDEX_FILE, TORCH_DTYPES

# name, safetensors dtype, shape
TensorDef = tuple[str, str, tuple[int, ...]]
# fills one tensor's bytes: (name, nbytes) -> flat uint8 CPU tensor
Filler = Callable[[str, int], torch.Tensor]


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def random_filler(seed: int) -> Filler:
    """Deterministic random bytes per (seed, name): the same checkpoint on every run and process."""

    def fill(name: str, nbytes: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(
            (seed * 1_000_003 + sum(name.encode()) * 7919 + len(name)) & 0x7FFFFFFF
        )
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)

    return fill


def block_filler(seed: int, block_bytes: int = 64 << 20) -> Filler:
    """Fast bytes for multi-GiB checkpoints: one random block, read cyclically from a per-tensor
    start, so tensors differ from each other and from other seeds without generating every byte."""
    block = torch.randint(
        0, 256, (block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    doubled = torch.cat([block, block])

    def fill(name: str, nbytes: int) -> torch.Tensor:
        start = (sum(name.encode()) * 2654435761 + len(name) * 97 + seed) % block_bytes
        if nbytes <= block_bytes:
            return doubled[start : start + nbytes]
        reps = -(-(nbytes + start) // block_bytes)
        return block.repeat(reps)[start : start + nbytes]

    return fill


def save_file(path: Path, defs: Iterable[TensorDef], fill: Filler, order: str = "name") -> None:
    """One .safetensors file. `order`: "name" or "reverse" (data order differs from name order)."""
    defs = sorted(defs, key=lambda d: d[0], reverse=order == "reverse")
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    cursor = 0
    for name, dtype, shape in defs:
        n = nbytes_of(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in defs:
            data = fill(name, nbytes_of(dtype, shape))
            f.write(data.contiguous().numpy().data if data.numel() else b"")


def save_sharded(directory: Path, defs: Sequence[TensorDef], fill: Filler, shards: int) -> None:
    """A directory with `shards` files and a model.safetensors.index.json mapping names to them."""
    directory.mkdir(parents=True, exist_ok=True)
    ordered = sorted(defs, key=lambda d: d[0])
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = ordered[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(directory / name, part, fill, order="reverse" if i % 2 else "name")
        weight_map.update({d[0]: name for d in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def qwen3_defs(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, vocab: int
) -> list[TensorDef]:
    """Tensor names and shapes of a Qwen3 dense model (bf16), as in its Hugging Face checkpoint."""
    defs: list[TensorDef] = [
        ("model.embed_tokens.weight", "BF16", (vocab, hidden)),
        ("model.norm.weight", "BF16", (hidden,)),
        ("lm_head.weight", "BF16", (vocab, hidden)),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        defs += [
            (p + "input_layernorm.weight", "BF16", (hidden,)),
            (p + "post_attention_layernorm.weight", "BF16", (hidden,)),
            (p + "self_attn.q_proj.weight", "BF16", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", "BF16", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", "BF16", (head_dim,)),
            (p + "self_attn.k_norm.weight", "BF16", (head_dim,)),
            (p + "mlp.gate_proj.weight", "BF16", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", "BF16", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", "BF16", (hidden, intermediate)),
        ]
    return defs


QWEN3_8B = {
    "layers": 36,
    "hidden": 4096,
    "intermediate": 12288,
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "vocab": 151936,
}


def mixed_defs(big_elements: int = 300_000) -> list[TensorDef]:
    """A small checkpoint with several dtypes, a zero-sized tensor and one large tensor."""
    return [
        ("a.weight", "BF16", (64, 33)),
        ("b.bias", "F32", (7,)),
        ("c.big", "F16", (big_elements,)),
        ("d.ids", "I64", (5, 3)),
        ("e.mask", "BOOL", (11,)),
        ("f.scale", "F8_E4M3", (129,)),
        ("g.empty", "F32", (0, 4)),
        ("h.int8", "I8", (3, 3, 3)),
        ("i.double", "F64", (17,)),
        ("j.weight", "BF16", (128, 96)),
    ]


__all__ = [
    "TORCH_DTYPES",
    "block_filler",
    "mixed_defs",
    "qwen3_defs",
    "random_filler",
    "save_file",
    "save_sharded",
]
