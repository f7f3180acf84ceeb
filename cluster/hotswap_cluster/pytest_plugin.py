"""pytest fixtures for tests against the local cluster (load with `pytest_plugins`).

- `hotswap_cluster` (session): starts the cluster through cluster/scripts/up.sh unless it already
  runs; at the end the last test session stops a cluster that tests started (one started by hand
  with `make cluster-up` stays; HOTSWAP_KEEP_CLUSTER=1 keeps it too).
- `kube_api` (session): an admin `kubernetes.client.ApiClient` (system:masters token).
- `namespace`: a fresh namespace per test, deleted afterwards; teardown waits until its pods are
  gone and checks that none of their processes survive. A failed test prints the namespace's events,
  pods and pod logs.
- `waiter`: `Waiter` for that namespace (wait helpers with diagnostics).
- `cluster_bin` (session): folder with helm and kubectl (and the control-plane binaries).
- `sa_client`: `sa_client(name, namespace=None)` -> ApiClient authenticated as that ServiceAccount.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from .control import ClusterHandle, bin_dir, ensure_up, release
from .diagnostics import describe_namespace
from .processes import pod_processes
from .tokens import client_for_service_account
from .waiting import Waiter, wait_for

_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[_failed_key] = True
    return report


@pytest.fixture(scope="session")
def hotswap_cluster() -> Iterator[ClusterHandle]:
    handle = ensure_up()
    os.environ["KUBECONFIG"] = handle.kubeconfig
    yield handle
    if os.environ.get("HOTSWAP_KEEP_CLUSTER") != "1":
        release(handle)


@pytest.fixture(scope="session")
def cluster_bin() -> Path:
    return bin_dir()


@pytest.fixture(scope="session")
def kube_api(hotswap_cluster: ClusterHandle) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=hotswap_cluster.kubeconfig)
    yield api
    api.close()


def create_test_namespace(core: client.CoreV1Api, name: str) -> None:
    """Create a namespace labelled as a test's and wait until pods can be admitted in it."""
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"hotswap.dev/test": "1"}))
    )
    # Pods are admitted only once the controller-manager made the namespace's default
    # ServiceAccount (and its kube-root-ca.crt, which the projected token volume needs).
    wait_for(
        lambda: (
            core.read_namespaced_service_account("default", name)
            and core.read_namespaced_config_map("kube-root-ca.crt", name)
        ),
        30,
        f"default ServiceAccount in {name}",
    )


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(kube_api)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:5]}"
    create_test_namespace(core, name)
    yield name
    if request.node.stash.get(_failed_key, False):
        print(f"\n===== diagnostics for namespace {name}\n{describe_namespace(kube_api, name)}")
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:  # the test may have deleted it itself
            raise

    # Waiting for the pods (not the namespace object, whose last steps take the namespace
    # controller another ~10 s) keeps teardown short; the kubelet finalises a pod's deletion only
    # once its processes are gone, and the process check below confirms it.
    wait_for(
        lambda: not core.list_namespaced_pod(name).items,
        120,
        f"pods of namespace {name} deleted",
        lambda: describe_namespace(kube_api, name),
    )
    wait_for(
        lambda: not pod_processes(namespace=name),
        10,
        f"no processes of namespace {name}",
        lambda: str(pod_processes(namespace=name)),
    )


@pytest.fixture
def waiter(kube_api: client.ApiClient, namespace: str) -> Waiter:
    return Waiter(kube_api, namespace)


@pytest.fixture
def sa_client(kube_api: client.ApiClient, namespace: str) -> Iterator[Callable[..., client.ApiClient]]:
    made: list[client.ApiClient] = []

    def make(name: str, ns: str | None = None) -> client.ApiClient:
        api = client_for_service_account(kube_api, ns or namespace, name)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()
