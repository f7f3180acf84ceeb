"""`hotswap` against the local cluster's real apiserver (CRD validation, AlreadyExists, 404s).

No operator runs in these namespaces, so where a command reads a rollout's progress the test writes
the WeightVersion's status itself, through the status subresource, exactly as the operator would;
tests/chart/test_chart_install.py runs the CLI against the real operator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hotswap_testing.waiting import wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster

GROUP, VERSION = "hotswap.dev", "v1alpha1"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(hotswap_cluster: Any, cli_crds: None) -> dict[str, str]:
    # the CLI runs as a process; the checkout's packages, as `make` sets them
    path = os.pathsep.join(str(REPO / d) for d in ("cli", "api", "operator", "engine"))
    return {**os.environ, "KUBECONFIG": hotswap_cluster.kubeconfig, "PYTHONPATH": path}


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotswap_cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def custom(kube_api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(kube_api)


def make_pool(custom: Any, namespace: str, name: str = "demo") -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "vllm"}]}},
            "model": {"path": "models/base"},
            "checkpointVolume": {"source": {"emptyDir": {}}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", body)


def set_status(custom: Any, namespace: str, name: str, **status: Any) -> None:
    """What the operator writes (WeightVersionStatus, camelCase)."""
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "weightversions", name, {"status": status}
    )


def get_wv(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "weightversions", name
    )
    return obj


def test_publish_creates_a_weight_version_once(env: dict[str, str], namespace: str, custom: Any) -> None:
    out = cli(env, "publish", "ghost", "--version", "v1", "--path", "ck/1", "-n", namespace)
    assert out.returncode == 3 and out.stderr.startswith(
        f"hotswap: not-found: inferencepool {namespace}/ghost"
    )

    make_pool(custom, namespace)
    args = ["publish", "demo", "--version", "v1", "--path", "ck/1", "--sha256-manifest", "ck/1/sha.json"]
    out = cli(env, *args, "--strategy", "Broadcast", "--timeout", "90s", "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "weightversion.hotswap.dev/demo-v1 created\n"
    wv = get_wv(custom, namespace, "demo-v1")
    assert wv["spec"] == {
        "poolRef": {"name": "demo"},
        "version": "v1",
        "source": {"path": "ck/1", "sha256Manifest": "ck/1/sha.json"},
        "strategy": "Broadcast",
        "timeout": "90s",
    }
    assert wv["metadata"]["labels"] == {"hotswap.dev/pool": "demo"}

    again = cli(env, "publish", "demo", "--version", "v1", "--path", "ck/other", "-n", namespace)
    assert again.returncode == 2
    assert again.stderr.startswith("hotswap: usage: version 'v1' of pool 'demo' exists already")


def test_status_table_and_json(env: dict[str, str], namespace: str, custom: Any) -> None:
    assert cli(env, "status", "nope", "-n", namespace).returncode == 3
    make_pool(custom, namespace)
    assert cli(env, "publish", "demo", "--version", "v1", "--path", "ck/1", "-n", namespace).returncode == 0
    out = cli(env, "status", "demo", "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert f"InferencePool {namespace}/demo: desired 0" in out.stdout
    assert "latest rollout: demo v1: Pending" in out.stdout and out.stdout.rstrip().endswith("no pods")
    doc = json.loads(cli(env, "status", "demo", "-n", namespace, "-o", "json").stdout)
    assert doc["latestRollout"]["version"] == "v1" and doc["latestRollout"]["phase"] == "Pending"


def test_rollback_publishes_an_earlier_checkpoint_as_a_new_version(
    env: dict[str, str], namespace: str, custom: Any
) -> None:
    make_pool(custom, namespace)
    out = cli(env, "rollback", "demo", "-n", namespace)
    assert out.returncode == 3 and "no earlier Complete version" in out.stderr

    for i, version in enumerate(("v1", "v2"), start=1):
        assert (
            cli(env, "publish", "demo", "--version", version, "--path", f"ck/{i}", "-n", namespace).returncode
            == 0
        )
        set_status(
            custom, namespace, f"demo-{version}", phase="Complete", completionTime=f"2026-01-01T00:0{i}:00Z"
        )
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "inferencepools", "demo", {"status": {"currentVersion": "v2"}}
    )
    out = cli(env, "rollback", "demo", "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "weightversion.hotswap.dev/demo-v1-rollback-1 created\n"
    wv = get_wv(custom, namespace, "demo-v1-rollback-1")
    assert wv["spec"]["source"] == {"path": "ck/1"} and wv["spec"]["version"] == "v1-rollback-1"
    assert wv["metadata"]["annotations"]["hotswap.dev/rollback-of"] == "v1"

    out = cli(env, "rollback", "demo", "--to", "base", "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert get_wv(custom, namespace, "demo-base-rollback-1")["spec"]["source"] == {"path": "models/base"}
    out = cli(env, "rollback", "demo", "--to", "v9", "-n", namespace)
    assert out.returncode == 3 and "'v9' is not in this pool's history" in out.stderr


class Following:
    """`hotswap publish ... --wait` as a process, its progress lines (stderr) collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hotswap_cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_lines(self, count: int) -> None:
        def shown() -> bool:
            assert self.proc.poll() is None or len(self.lines) >= count, f"the CLI exited: {self.lines}"
            return len(self.lines) >= count

        wait_for(shown, 60, f"the CLI showing {count} progress lines", lambda: "\n".join(self.lines))

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code, out, "\n".join(self.lines) + "\n"


def drive(following: Following, custom: Any, namespace: str, name: str, steps: list[dict[str, Any]]) -> None:
    """Writes the statuses one by one, like an operator's rollout, each once the CLI showed the one
    before (its first line is the new version, still Pending): the CLI must show every phase."""
    for shown, status in enumerate(steps, start=1):
        following.wait_lines(shown)
        set_status(custom, namespace, name, **status)


def test_publish_wait_follows_to_complete(env: dict[str, str], namespace: str, custom: Any) -> None:
    make_pool(custom, namespace)
    steps = [
        {"phase": "Staging", "replicas": 2},
        {"phase": "Updating", "replicas": 2, "updatedReplicas": 1, "stageDurations": {"staging": 1.5}},
        {
            "phase": "Complete",
            "replicas": 2,
            "updatedReplicas": 2,
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:00:04Z",
            "stageDurations": {"staging": 1.5, "transfer": 2.0, "reload": 0.25},
        },
    ]
    following = Following(
        env, "publish", "demo", "--version", "v2", "--path", "ck/2", "-n", namespace, "--wait"
    )
    drive(following, custom, namespace, "demo-v2", steps)
    code, stdout, stderr = following.finish()
    assert code == 0, stderr
    phases = [line.split()[0] for line in stderr.splitlines()]
    assert phases == ["Pending", "Staging", "Updating", "Complete"], stderr
    assert stdout.splitlines()[-1] == (
        "demo v2: Complete in 4.0s, 2/2 pods (staging 1.5s, transfer 2.0s, reload 0.2s)"
    )


def test_publish_wait_reports_failure_and_timeout(env: dict[str, str], namespace: str, custom: Any) -> None:
    make_pool(custom, namespace)
    following = Following(
        env, "publish", "demo", "--version", "v3", "--path", "ck/3", "-n", namespace, "--wait"
    )
    drive(
        following, custom, namespace, "demo-v3", [{"phase": "Failed", "message": "checkpoint ck/3 not found"}]
    )
    code, _, stderr = following.finish()
    assert code == 1
    assert stderr.splitlines()[-1] == "hotswap: failed: demo-v3 failed: checkpoint ck/3 not found"

    out = cli(
        env,
        "publish",
        "demo",
        "--version",
        "v4",
        "--path",
        "ck/4",
        "-n",
        namespace,
        "--wait",
        "--timeout-wait",
        "2",
    )
    assert out.returncode == 4
    last = out.stderr.splitlines()[-1]
    assert (
        last.startswith("hotswap: timeout: gave up waiting after 2.") and "demo-v4 is still Pending" in last
    )
