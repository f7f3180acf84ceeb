"""The package's installed metadata for processes that import a source checkout from PYTHONPATH.

vLLM finds plugins through entry points, which live in an installed distribution's metadata, not in
the source tree. The shared venv's editable install belongs to whichever checkout installed it
last, so tests do not rely on it: `write_dist_info` writes the `.dist-info` that `pip install .`
would give this checkout (name, version, the entry points of pyproject.toml) into a folder that
goes first on the engine's PYTHONPATH, where it shadows any other copy.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def entry_points(pyproject: Path = REPO / "pyproject.toml") -> dict[str, dict[str, str]]:
    """`[project.entry-points]` and `[project.scripts]` (as console_scripts), group by group."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups: dict[str, dict[str, str]] = {g: dict(v) for g, v in project.get("entry-points", {}).items()}
    if project.get("scripts"):
        groups["console_scripts"] = dict(project["scripts"])
    return groups


def write_dist_info(dest: Path, pyproject: Path = REPO / "pyproject.toml") -> Path:
    """Write `<name>-<version>.dist-info` into `dest` (created if needed); returns `dest`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name, version = project["name"], project["version"]
    info = dest / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines: list[str] = []
    for group, items in entry_points(pyproject).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in items.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return dest
