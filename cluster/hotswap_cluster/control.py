"""Starting, reusing and stopping the local cluster through cluster/scripts (never by hand)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLUSTER_DIR = Path(__file__).resolve().parents[1]
SCRIPTS = CLUSTER_DIR / "scripts"


def cache_dir() -> Path:
    return Path(os.environ.get("HOTSWAP_CACHE", str(Path.home() / ".cache" / "hotswap")))


def run_dir() -> Path:
    return Path(os.environ.get("HOTSWAP_CLUSTER_DIR", str(cache_dir() / "run" / "cluster")))


def log_dir() -> Path:
    return Path(os.environ.get("HOTSWAP_CLUSTER_LOGS", str(run_dir() / "logs")))


def kubelet_state_dir() -> Path:
    return run_dir() / "kubelet"


@dataclass(frozen=True)
class ClusterHandle:
    kubeconfig: str
    started_here: bool


def bin_dir() -> Path:
    """The folder holding etcd, kube-apiserver, kube-controller-manager, helm and kubectl (built
    or fetched first if this version is not cached)."""
    res = subprocess.run(["bash", str(SCRIPTS / "build.sh")], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cluster build failed (rc {res.returncode}):\n{res.stderr[-6000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def running_kubeconfig() -> str | None:
    """The admin kubeconfig path if every part of the cluster runs, else None."""
    res = subprocess.run(["bash", str(SCRIPTS / "status.sh")], capture_output=True, text=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def up() -> str:
    """Runs cluster-up (building binaries if needed); returns the admin kubeconfig path."""
    res = subprocess.run(["bash", str(SCRIPTS / "up.sh")], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            f"cluster-up failed (rc {res.returncode}):\n{res.stderr[-6000:]}\n{res.stdout[-2000:]}"
        )
    last = res.stdout.strip().splitlines()[-1]
    prefix = "export KUBECONFIG="
    if not last.startswith(prefix):
        raise RuntimeError(f"cluster-up's last line is not {prefix}...: {last!r}")
    return last[len(prefix) :]


def down() -> None:
    res = subprocess.run(["bash", str(SCRIPTS / "down.sh")], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cluster-down failed (rc {res.returncode}):\n{res.stderr[-4000:]}")


def _sessions_dir() -> Path:
    return run_dir() / "test-sessions"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def ensure_up() -> ClusterHandle:
    """Reuses a running cluster, else starts one. Test sessions register themselves so that the
    last one to finish stops a cluster that a test session started (never one started by hand)."""
    kubeconfig = running_kubeconfig()
    running = kubeconfig is not None
    if kubeconfig is None:
        kubeconfig = up()
    sessions = _sessions_dir()
    sessions.mkdir(parents=True, exist_ok=True)
    if not running:
        (run_dir() / "started-by-tests").touch()
    (sessions / str(os.getpid())).touch()
    return ClusterHandle(kubeconfig=kubeconfig, started_here=not running)


def release(handle: ClusterHandle) -> bool:
    """Unregisters this session; stops the cluster if tests started it and no other live test
    session uses it. Returns whether it stopped the cluster."""
    sessions = _sessions_dir()
    (sessions / str(os.getpid())).unlink(missing_ok=True)
    others = [p for p in sessions.glob("*") if p.name.isdigit() and _alive(int(p.name))]
    marker = run_dir() / "started-by-tests"
    if others or not marker.exists():
        return False
    marker.unlink(missing_ok=True)
    down()
    return True
