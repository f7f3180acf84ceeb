"""The AWQ test checkpoint (hotswap_testing.tiny_quantized) holds the weights it quantized: unpacked the
way vLLM's AWQ loader unpacks it (`_REVERSE_AWQ_PACK_ORDER` in vllm/.../quantization/auto_awq.py,
copied here so this test imports no vLLM), every value is within one quantization step of the original
(half a step, plus the rounded zero point's shift at a group's edges). A wrong packing order would
still serve (an engine test cannot tell), but another model: up to 18 steps off."""

from __future__ import annotations

import torch
from hotswap_testing.tiny_quantized import quantize_linear

VLLM_REVERSE_AWQ_PACK_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_like_vllm(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    values = (packed.unsqueeze(-1) >> shifts) & 0xF
    return values[:, :, VLLM_REVERSE_AWQ_PACK_ORDER].reshape(packed.shape[0], -1)


def test_awq_checkpoint_dequantizes_to_the_weights_it_came_from() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(96, 256) * 0.2).to(torch.bfloat16)  # (out, in) as torch.nn.Linear holds it
    q = quantize_linear(weight, group_size=64)
    assert q["qweight"].shape == (256, 96 // 8) and q["qweight"].dtype == torch.int32
    assert q["qzeros"].shape == (256 // 64, 96 // 8) and q["scales"].shape == (256 // 64, 96)
    assert q["scales"].dtype == torch.bfloat16

    scales = q["scales"].float().repeat_interleave(64, dim=0)
    zeros = unpack_like_vllm(q["qzeros"]).repeat_interleave(64, dim=0)
    dequantized = ((unpack_like_vllm(q["qweight"]) - zeros) * scales).t()
    error = (dequantized - weight.float()).abs()
    step = scales.t()
    assert (error <= step + 1e-6).all(), float((error / step).max())
    assert float((error / step).mean()) < 0.3  # round to nearest: a quarter step on average
    assert len(torch.unique(unpack_like_vllm(q["qweight"]))) == 16  # all 4 bits in use
