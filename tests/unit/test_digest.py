"""digest.fingerprint: the same bytes give the same value, in any chunking; a changed byte does not."""

from __future__ import annotations

import pytest
import torch
from hotswap_engine.inference import digest


def test_same_bytes_same_fingerprint_any_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = digest.fingerprint(t)
    monkeypatch.setattr(digest, "_CHUNK_WORDS", 7)
    assert digest.fingerprint(t) == whole
    assert digest.fingerprint(t.clone()) == whole
    assert whole.startswith("bfloat16:1000x37:")


def test_any_changed_byte_changes_the_fingerprint() -> None:
    t = torch.arange(4099, dtype=torch.uint8)  # not a multiple of 8 bytes: padded
    base = digest.fingerprint(t)
    for i in (0, 7, 8, 2048, 4098):
        u = t.clone()
        u[i] ^= 1
        assert digest.fingerprint(u) != base, i
    swapped = t.clone()
    swapped[[0, 8]] = swapped[[8, 0]]  # the same bytes elsewhere: position-weighted sum differs
    assert digest.fingerprint(swapped) != base


def test_shape_dtype_and_layout() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert digest.fingerprint(t) != digest.fingerprint(t.reshape(4, 3))
    assert digest.fingerprint(t.t()) == digest.fingerprint(t.t().contiguous())
    assert digest.fingerprint(torch.zeros(0, 4)).endswith(":" + "0" * 32)
    assert digest.fingerprint(torch.tensor([True, False])).startswith("bool:2:")
