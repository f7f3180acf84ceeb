"""digest.fingerprint: the same bytes give the same value, in any chunking; a changed byte does not."""

from __future__ import annotations

import pytest
import torch
from hotswap_engine import digest


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


@pytest.mark.parametrize("words", [0, 1, 65520, 65521, 65522, 3 * 65521 + 17])
def test_cpu_matmul_form_equals_the_element_wise_form(words: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path (rows times weights) and the element-wise one (what CUDA runs) agree bit for bit,
    across row boundaries, partial rows, chunk boundaries and wrapping int64 sums."""
    g = torch.Generator().manual_seed(words)
    w = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, generator=g) * 3  # sums overflow
    assert [int(v) for v in digest._sums_cpu(w)] == [int(v) for v in digest._sums(w)]
    monkeypatch.setattr(digest, "_CHUNK_WORDS", 2 * 65521 + 5)  # several chunks, partial last one
    assert [int(v) for v in digest._sums_cpu(w)] == [int(v) for v in digest._sums(w)]
