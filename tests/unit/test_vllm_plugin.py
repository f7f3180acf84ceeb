"""The vLLM plugin's registration point and the launcher's check for vLLM's weight-transfer lifecycle,
without importing vLLM (tests/engine/test_vllm_plugin.py checks the installed vLLM)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hotswap_engine.inference import vllm_plugin
from hotswap_testing.package_metadata import REPO, entry_points, write_dist_info


def test_pyproject_declares_the_plugin_entry_point_vllm_loads() -> None:
    declared = entry_points()["vllm.general_plugins"]
    assert declared == {"hotswap": "hotswap_engine.inference.vllm_plugin:register"}
    module, _, attr = declared["hotswap"].partition(":")
    assert getattr(importlib.import_module(module), attr) is vllm_plugin.register


def test_written_dist_info_exposes_the_entry_point(tmp_path: Path) -> None:
    code = (
        "from importlib.metadata import entry_points;"
        "print([e.value for e in entry_points(group='vllm.general_plugins', name='hotswap')])"
    )
    env = dict(os.environ, PYTHONPATH=str(write_dist_info(tmp_path)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['hotswap_engine.inference.vllm_plugin:register']"


def _fake_vllm(missing: set[str]) -> types.SimpleNamespace:
    """A loader over a vLLM whose lifecycle lacks the `module:attr.member` names in `missing`."""

    def load(name: str) -> object:
        if name in missing:
            raise ImportError(name)
        attrs: dict[str, object] = {}
        for module, attr, members in vllm_plugin.LIFECYCLE_API:
            if module != name or f"{module}:{attr}" in missing:
                continue
            attrs[attr] = types.SimpleNamespace(
                **{m: (lambda: None) for m in members if f"{module}:{attr}.{m}" not in missing}
            )
        return types.SimpleNamespace(**attrs)

    return types.SimpleNamespace(load=load)


def test_a_vllm_with_the_whole_lifecycle_has_no_gaps() -> None:
    assert vllm_plugin.lifecycle_gaps(_fake_vllm(set()).load) == []


def test_gaps_name_what_is_missing() -> None:
    missing = {
        "vllm.distributed.weight_transfer.factory",  # a vLLM from before the registry
        "vllm.v1.engine.async_llm:AsyncLLM.start_weight_update",
        "vllm.model_executor.model_loader.reload:finalize_layerwise_reload",
    }
    gaps = vllm_plugin.lifecycle_gaps(_fake_vllm(missing).load)
    assert sorted(gaps) == sorted(missing)
    message = vllm_plugin.unsupported_message("0.10.1", gaps)
    assert f">= {vllm_plugin.MIN_VLLM_VERSION}" in message and "0.10.1" in message
    assert "AsyncLLM.start_weight_update" in message


def test_launcher_refuses_a_vllm_without_the_lifecycle_naming_the_minimum(tmp_path: Path) -> None:
    # An "older image": a vllm package of an old release with none of the lifecycle's modules.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text('__version__ = "0.10.1"\n')
    source = [str(tmp_path), str(REPO / "api"), str(REPO / "engine")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(source))
    env.pop("VLLM_SERVER_DEV_MODE", None)
    out = subprocess.run(
        [sys.executable, "-m", "hotswap_engine.inference.vllm_launcher", "/models/any"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"vLLM >= {vllm_plugin.MIN_VLLM_VERSION}" in out.stderr and "0.10.1" in out.stderr, out.stderr


@pytest.mark.parametrize("version", ["0.10.1", "?"])
def test_message_is_one_line(version: str) -> None:
    assert "\n" not in vllm_plugin.unsupported_message(version, ["a", "b"])


def test_the_engine_images_package_metadata_matches_pyproject() -> None:
    """images/engine copies the source without pip, plus a static .dist-info: it must say what
    pyproject.toml says (name, version, the vLLM plugin entry point)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = REPO / "images" / "engine" / "hotswap.dist-info"
    metadata = dict(
        line.split(": ", 1) for line in (info / "METADATA").read_text().splitlines() if ": " in line
    )
    assert (metadata["Name"], metadata["Version"]) == (project["name"], project["version"])
    dockerfile = (REPO / "images" / "engine" / "Dockerfile").read_text()
    assert f"/opt/hotswap/{project['name']}-{project['version']}.dist-info" in dockerfile
    lines = [ln.strip() for ln in (info / "entry_points.txt").read_text().splitlines() if ln.strip()]
    assert lines == ["[vllm.general_plugins]"] + [
        f"{k} = {v}" for k, v in entry_points()["vllm.general_plugins"].items()
    ]
