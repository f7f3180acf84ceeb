"""Tensor fingerprints: the same 128-bit value for the same bytes on CPU and GPU, cheap on a GPU.

Why not sha256: hashing a 16 GB model on the host takes tens of seconds and first copies every
byte off the GPU. This sums the tensor's bytes as little-endian int64 words twice, plainly and
weighted by position (both modulo 2^64: integer addition is exact and order-free, so CPU and GPU,
any chunking, any reduction order give the same result). It detects any single changed word and
practically any corruption; it is not meant to resist a forger.

On CPU the weighted sum runs as an integer matrix-vector product over rows of `_MODULUS` words (the
weights 1..65521 repeat with that period, so row r, column c has weight c + 1): one pass, about 9x
faster than the element-wise form, which the agent needs because it fingerprints a whole host copy
of a path-sourced version after every update. CUDA has no integer matmul; there the element-wise form
runs (the GPU does it at memory speed). Both give the same value (integer sums modulo 2^64).
"""

from __future__ import annotations

import torch

_CHUNK_WORDS = 1 << 26  # 512 MiB of int64 temporaries at most
_MODULUS = 65521  # position weights cycle through 1..65521 (a prime: shifted blocks sum differently)


def fingerprint(t: torch.Tensor) -> str:
    """`<dtype>:<shape>:<hex>` of a tensor's bytes (contiguous copy if needed)."""
    data = t.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
    pad = (-raw.numel()) % 8
    if pad:
        raw = torch.cat([raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)])
    words = raw.view(torch.int64)
    plain, weighted = (_sums_cpu if words.device.type == "cpu" else _sums)(words)
    shape = "x".join(str(d) for d in t.shape)
    value = ((int(plain) & (2**64 - 1)) << 64) | (int(weighted) & (2**64 - 1))
    return f"{str(t.dtype).removeprefix('torch.')}:{shape}:{value:032x}"


def _sums(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w_i, Σ w_i·(i mod _MODULUS + 1)) element-wise, in chunks of at most `_CHUNK_WORDS`."""
    plain = torch.zeros((), dtype=torch.int64, device=words.device)
    weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        idx = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=words.device)
        plain += chunk.sum()
        weighted += (chunk * (idx % _MODULUS + 1)).sum()
    return plain, weighted


def _sums_cpu(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums as `_sums`, the weighted one as rows of `_MODULUS` words times the weights."""
    weights = torch.arange(1, _MODULUS + 1, dtype=torch.int64)
    rows_per_chunk = max(1, _CHUNK_WORDS // _MODULUS)
    full = words.numel() // _MODULUS * _MODULUS
    plain = words.sum()
    weighted = torch.zeros((), dtype=torch.int64)
    for start in range(0, full, rows_per_chunk * _MODULUS):
        rows = words[start : min(full, start + rows_per_chunk * _MODULUS)].view(-1, _MODULUS)
        weighted += rows.matmul(weights).sum()
    tail = words[full:]
    weighted += (tail * weights[: tail.numel()]).sum()
    return plain, weighted
