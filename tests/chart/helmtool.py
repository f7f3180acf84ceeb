"""The helm binary the cluster scripts build (cluster/versions.env pins it), and rendering helpers."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "hotswap"
Obj = dict[str, Any]


@functools.cache
def helm_binary() -> Path:
    """$HOTSWAP_HELM, else the helm in the folder cluster/scripts/build.sh prints (it fetches or builds
    what is missing, and only prints the folder when everything is there)."""
    explicit = os.environ.get("HOTSWAP_HELM")
    if explicit:
        return Path(explicit)
    out = subprocess.run(
        ["bash", str(REPO / "cluster" / "scripts" / "build.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, f"cluster/scripts/build.sh failed:\n{out.stderr[-4000:]}"
    helm = Path(out.stdout.strip().splitlines()[-1]) / "helm"
    assert helm.exists(), f"{helm} missing after cluster/scripts/build.sh"
    return helm


def helm(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    home = REPO / "build" / "helm-home"  # helm's caches and config, never the user's
    full_env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        **(env or {}),
    }
    out = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check:
        assert out.returncode == 0, f"helm {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out


def set_args(values: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json" if value.startswith(("[", "{", '"')) else "--set", f"{key}={value}"]
    return out


def render(
    *extra: str, namespace: str = "hotswap-system", release: str = "hs", chart: Path = CHART
) -> list[Obj]:
    out = helm("template", release, str(chart), "--namespace", namespace, *extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def load_yaml(path: Path) -> Obj:
    doc: Obj = yaml.safe_load(path.read_text())
    return doc
