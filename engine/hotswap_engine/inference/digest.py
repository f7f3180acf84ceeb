"""Tensor fingerprints: the same 128-bit value for the same bytes on CPU and GPU, cheap on a GPU.

Why not sha256: hashing a 16 GB model on the host takes tens of seconds and first copies every
byte off the GPU. This sums the tensor's bytes as little-endian int64 words twice, plainly and
weighted by position (both modulo 2^64: integer addition is exact and order-free, so CPU and GPU,
any chunking, any reduction order give the same result). It detects any single changed word and
practically any corruption; it is not meant to resist a forger.
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
    plain = torch.zeros((), dtype=torch.int64, device=words.device)
    weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        idx = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=words.device)
        plain += chunk.sum()
        weighted += (chunk * (idx % _MODULUS + 1)).sum()
    shape = "x".join(str(d) for d in t.shape)
    value = ((int(plain) & (2**64 - 1)) << 64) | (int(weighted) & (2**64 - 1))
    return f"{str(t.dtype).removeprefix('torch.')}:{shape}:{value:032x}"
