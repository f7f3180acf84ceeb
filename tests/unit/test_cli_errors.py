"""Exit codes for environment problems: no cluster to talk to (5), a context that does not exist (2)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import yaml
from hotswap_cli.__main__ import run
from hotswap_cli.commands import Io
from hotswap_cli.errors import ExitCode


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


def test_unreachable_cluster_is_exit_5(tmp_path: Path) -> None:
    cfg = kubeconfig(tmp_path, f"https://127.0.0.1:{closed_port()}")
    err = io.StringIO()
    code = run(["status", "demo", "--kubeconfig", str(cfg)], Io(out=io.StringIO(), err=err))
    assert code == ExitCode.API
    assert err.getvalue().startswith("hotswap: api: cannot reach the Kubernetes API at https://127.0.0.1:")


def test_unknown_context_is_a_usage_error(tmp_path: Path) -> None:
    cfg = kubeconfig(tmp_path, "https://127.0.0.1:1")
    err = io.StringIO()
    code = run(
        ["status", "demo", "--kubeconfig", str(cfg), "--context", "other"], Io(out=io.StringIO(), err=err)
    )
    assert code == ExitCode.USAGE and "context 'other'" in err.getvalue()
