"""The hotswap weight-transfer engine in a real (offline, single-process) vLLM engine, found through
the package's `vllm.general_plugins` entry point alone and driven by vLLM's own lifecycle methods
(start_weight_update, update_weights, finish_weight_update): apply, an aborted stream, the model's
state after it, restore, and a version mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hotswap_testing.tiny_model import build_tiny_model, make_variant
from vllm_harness import START_TIMEOUT_S, engine_env

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("engine")
    base = build_tiny_model(root / "base", seed=0)
    variant = make_variant(base, root / "variant", seed=1)
    work = root / "work"
    work.mkdir()
    script = Path(__file__).with_name("vllm_transfer_engine_probe.py")
    out = subprocess.run(
        [sys.executable, str(script), str(base), str(variant), str(work)],
        env=engine_env(),
        capture_output=True,
        timeout=START_TIMEOUT_S,
    )
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("PROBE ")]
    assert lines, out.stderr.decode()[-4000:]
    report: dict[str, Any] = json.loads(lines[-1].removeprefix("PROBE "))
    return report


def test_the_entry_point_plugs_the_engine_into_vllm(probe: dict[str, Any]) -> None:
    assert probe["engine"] == "HotswapWeightTransferEngine"


def test_apply_changes_the_answer_and_sets_the_weight_version(probe: dict[str, Any]) -> None:
    assert probe["v1_error"] is None
    worker = probe["v1_result"]
    assert worker["rank"] == 0 and worker["version"] == "v1" and worker["tensors"] == 25
    assert probe["v1"] != probe["base"]
    assert probe["v1_version"] == "v1"


def test_aborted_stream_leaves_a_runnable_model_and_base_restores_exactly(probe: dict[str, Any]) -> None:
    assert (
        "rank 0: HandoffAborted" in probe["abort_error"] and "cancelled by the probe" in probe["abort_error"]
    )
    # vLLM's layerwise reload had moved unfinished layers to the meta device: they are back
    assert probe["meta_params"] == [] and probe["pending_layers"] == 0
    assert probe["after_abort"]  # a forward pass ran
    assert probe["after_abort_version"] == "v1"  # a failed update sets no version
    assert probe["restore_error"] is None
    assert probe["restored"] == probe["base"]


def test_version_mismatch_is_refused_and_changes_nothing(probe: dict[str, Any]) -> None:
    assert "is sending version 'other'" in probe["mismatch_error"]
    assert "asked for 'v2'" in probe["mismatch_error"]
    assert probe["after_mismatch"] == probe["base"]
