"""Tensor parallelism: two vLLM CPU workers, each receiving whole tensors over the hand-off and
taking its own slice through vLLM's weight loaders.

Both hand-off layouts: one sender serving both ranks from shared CPU slots (the CPU layout), and one
sender per rank reached through an endpoint with `{rank}` (the GPU layout: one agent rank worker per
GPU). TP=2 answers may differ from TP=1 ones (reduction order), so the checks are within this
engine: a version pushed either way gives the same answers, and re-pushing the base restores the
answers of the engine's cold start exactly (a wrong slice on either rank would change them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hotswap_testing.tiny_model import build_tiny_model, make_variant
from vllm_harness import Launcher, Pusher, apply, start_launcher, stop, texts, wait_ready

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "base", seed=0)
    return base, make_variant(base, root / "variant", seed=1)


@pytest.fixture(scope="module")
def tp2(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    handle = start_launcher(models[0], tmp_path_factory.mktemp("tp2"), ["--tensor-parallel-size", "2"])
    try:
        wait_ready(handle)
        handle.base_texts = texts(handle)
        yield handle
    finally:
        stop(handle.proc)


def shared(launcher: Launcher) -> list[Pusher]:
    return [Pusher(launcher.workdir, workers=2)]


def per_rank(launcher: Launcher) -> list[Pusher]:
    return [Pusher(launcher.workdir, tag=f"-{rank}") for rank in range(2)]


async def test_tp_workers_each_apply_their_slice(tp2: Launcher, models: tuple[Path, Path]) -> None:
    base, variant = models
    per_rank_endpoint = f"ipc://{tp2.workdir}/handoff-{{rank}}.sock"

    result, _ = await apply(tp2, variant, "v1", pushers=shared(tp2))
    assert result.ok, result
    assert sorted(w["rank"] for w in result.workers) == [0, 1]
    variant_texts = texts(tp2)
    assert variant_texts != tp2.base_texts

    result, _ = await apply(tp2, base, "base", pushers=per_rank(tp2), endpoint=per_rank_endpoint)
    assert result.ok, result
    assert texts(tp2) == tp2.base_texts

    result, _ = await apply(tp2, variant, "v1", pushers=per_rank(tp2), endpoint=per_rank_endpoint)
    assert result.ok, result
    assert texts(tp2) == variant_texts

    result, _ = await apply(tp2, base, "base", pushers=shared(tp2))
    assert result.ok, result
    assert texts(tp2) == tp2.base_texts


async def test_abort_on_one_rank_fails_the_apply(tp2: Launcher, models: tuple[Path, Path]) -> None:
    base, variant = models
    per_rank_endpoint = f"ipc://{tp2.workdir}/handoff-{{rank}}.sock"
    # rank 0 receives the whole variant, rank 1's sender aborts midway
    pushers = [Pusher(tp2.workdir, tag="-0"), Pusher(tp2.workdir, tag="-1", abort_after=2)]
    result, _ = await apply(tp2, variant, "v-half", pushers=pushers, endpoint=per_rank_endpoint)
    assert not result.ok
    assert "rank 1: HandoffAborted" in (result.error or ""), result.error
    result, _ = await apply(tp2, base, "base", pushers=shared(tp2))
    assert result.ok, result
    assert texts(tp2) == tp2.base_texts
