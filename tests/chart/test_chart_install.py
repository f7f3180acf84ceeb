"""The chart against the local cluster: install, the operator at work as the chart's ServiceAccount,
`helm upgrade` applying a changed CRD, and `helm uninstall` leaving nothing behind.

The local kubelet runs container commands as local processes (images are ignored), so the chart's
default command `python -m hotswap_operator` runs the project's operator; it authenticates with the
pod's projected ServiceAccount token (in-cluster config), never the admin kubeconfig, which the
kubelet does not pass to pods.

The cluster is shared with other tests, so the release watches only the test's namespace and keeps
the CRDs on uninstall (crds.keep, the default); CRDs that exist already are adopted the documented
way (Helm's ownership label and annotations) and restored from crds/ at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmtool import CHART, REPO, helm
from hotswap_cluster.control import log_dir
from hotswap_cluster.processes import pod_processes
from hotswap_cluster.waiting import Waiter, wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster

GROUP, VERSION = "hotswap.dev", "v1alpha1"
CRD_NAMES = ("inferencepools.hotswap.dev", "weightversions.hotswap.dev")
RELEASE = "hs"
FULLNAME = "hs-hotswap"
Obj = dict[str, Any]


def restore_crds(ext: Any) -> None:
    """crds/ as generated, without Helm's ownership marks (what tests/operator applies)."""
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        try:
            current = ext.read_custom_resource_definition(name)
        except client.ApiException as e:
            if e.status != 404:
                raise
            ext.create_custom_resource_definition(body)
            continue
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, body)


def adopt_crds(ext: client.ApiextensionsV1Api, namespace: str) -> None:
    """Mark existing CRDs as the release's, so `helm install` takes them over instead of failing."""
    for name in CRD_NAMES:
        try:
            ext.patch_custom_resource_definition(
                name,
                {
                    "metadata": {
                        "labels": {"app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {
                            "meta.helm.sh/release-name": RELEASE,
                            "meta.helm.sh/release-namespace": namespace,
                        },
                    }
                },
            )
        except client.ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def helm_env(hotswap_cluster: Any) -> dict[str, str]:
    return {"KUBECONFIG": hotswap_cluster.kubeconfig}


@pytest.fixture
def crd_guard(
    kube_api: client.ApiClient, namespace: str, helm_env: dict[str, str]
) -> Iterator[client.ApiextensionsV1Api]:
    ext = client.ApiextensionsV1Api(kube_api)
    yield ext
    # A test that stopped half-way leaves the release: its cluster-scoped objects would outlive the
    # namespace and block the next install. Pools first, while the operator can still finalize them.
    if helm("status", RELEASE, "-n", namespace, check=False, env=helm_env).returncode == 0:
        custom: Any = client.CustomObjectsApi(kube_api)
        for plural in ("weightversions", "inferencepools"):
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        wait_for(
            lambda: (
                not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools")["items"]
            ),
            60,
            "pools deleted",
        )
        helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "2m", env=helm_env, check=False)
    restore_crds(ext)


def hotswap_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotswap_cli", *args],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("cli", "api", "operator")),
            **env,
        },
        timeout=120,
    )


def operator_log(namespace: str, pod: str) -> str:
    path = log_dir() / "pods" / f"{namespace}_{pod}_operator.log"
    return path.read_text() if path.exists() else ""


def served(custom: client.CustomObjectsApi, namespace: str) -> bool:
    for plural in ("inferencepools", "weightversions"):
        custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
    return True


def pool_body(name: str) -> Obj:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            # No pods: this test is about the chart's identity and permissions, not about vLLM.
            "replicas": 0,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0"}]}},
            "model": {"path": "models/base"},
            "checkpointVolume": {"source": {"emptyDir": {}}},
            "engine": {"device": "CPU"},
        },
    }


@pytest.mark.timeout(600)
def test_install_operate_upgrade_uninstall(
    kube_api: client.ApiClient,
    namespace: str,
    waiter: Waiter,
    helm_env: dict[str, str],
    crd_guard: client.ApiextensionsV1Api,
    tmp_path: Path,
) -> None:
    # Any: the client's optional-everywhere models would need a None check per attribute
    ext: Any = crd_guard
    core: Any = client.CoreV1Api(kube_api)
    apps: Any = client.AppsV1Api(kube_api)
    custom: Any = client.CustomObjectsApi(kube_api)
    coord: Any = client.CoordinationV1Api(kube_api)
    rbac: Any = client.RbacAuthorizationV1Api(kube_api)

    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "watchNamespaces": [namespace],
                # the pods of the local cluster share the host's network: bind the pod IP only
                "listenAddress": "$(POD_IP)",
                "liveness": {"port": 18080, "startupSeconds": 120},
                "metrics": {"port": 19090},
                "leaderElection": {"leaseDurationSeconds": 10},
            }
        )
    )
    adopt_crds(ext, namespace)
    install = helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        namespace,
        "-f",
        str(values),
        "--wait=watcher",
        "--timeout",
        "3m",
        env=helm_env,
        timeout=240,
    )
    assert "STATUS: deployed" in install.stdout, install.stdout
    assert (
        f"the namespaces {namespace}" in install.stdout and "kubectl get hspool,wv -A" in install.stdout
    )  # NOTES

    # The operator runs as the chart's ServiceAccount, holds the Lease the chart created.
    (pod,) = waiter.ready_pods(f"app.kubernetes.io/instance={RELEASE}", 1, timeout=180)
    assert pod.spec.service_account_name == FULLNAME
    lease = coord.read_namespaced_lease(FULLNAME, namespace)
    assert lease.spec.holder_identity == pod.metadata.name
    # The release's CRDs carry the keep policy. (Read from the release: other test sessions on this
    # shared cluster may re-apply crds/ at any moment, which drops the live annotations.)
    released = yaml.safe_load_all(helm("get", "manifest", RELEASE, "-n", namespace, env=helm_env).stdout)
    crds = [d for d in released if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(d["metadata"]["name"] for d in crds) == sorted(CRD_NAMES)
    assert all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in crds)
    wait_for(lambda: served(custom, namespace), 30, "hotswap resources served")

    # It works with exactly the chart's permissions: a pool gets its Deployment, token Secret, status.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", pool_body("demo"))
    waiter.until(lambda: apps.read_namespaced_deployment("demo", namespace), "deployment demo", timeout=90)
    waiter.until(
        lambda: core.read_namespaced_secret("demo-agent-token", namespace), "token secret", timeout=30
    )

    def pool_status() -> Obj | None:
        obj: Obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", "demo")
        return obj if (obj.get("status") or {}).get("selector") else None

    pool = waiter.until(pool_status, "pool status written by the operator", timeout=60)
    assert pool["status"]["selector"] == "hotswap.dev/pool=demo"

    # A WeightVersion through the CLI; one for a missing pool gets Accepted=False from the operator.
    pub = hotswap_cli(
        "publish", "demo", "--version", "v1", "--path", "ckpt/v1", "-n", namespace, env=helm_env
    )
    assert pub.returncode == 0, pub.stderr
    assert pub.stdout.strip() == "weightversion.hotswap.dev/demo-v1 created"
    ghost = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightVersion",
        "metadata": {"name": "ghost-v1"},
        "spec": {"poolRef": {"name": "ghost"}, "version": "v1", "source": {"path": "ckpt/v1"}},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", ghost)

    def not_accepted() -> Obj | None:
        wv: Obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "ghost-v1")
        conds = (wv.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "Accepted" and c["reason"] == "PoolNotFound"), None)

    cond = waiter.until(not_accepted, "ghost-v1 Accepted=False PoolNotFound", timeout=60)
    assert cond["status"] == "False" and "ghost" in cond["message"]
    status = hotswap_cli("status", "demo", "-n", namespace, "-o", "json", env=helm_env)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["name"] == "demo" and doc["replicas"] == 0 and doc["pods"] == []
    assert doc["latestRollout"]["version"] == "v1"

    # No call was refused. (kopf's one expected warning, that it may not list namespaces, does not
    # contain the word.)
    log = operator_log(namespace, pod.metadata.name)
    assert log, "no operator log"
    assert "forbidden" not in log.lower(), log[-4000:]

    # helm upgrade applies a changed CRD (Helm never upgrades a chart's crds/ folder; ours are templates).
    changed = tmp_path / "hotswap"
    shutil.copytree(CHART, changed)
    crd_file = changed / "files" / "crds" / "weightversions.hotswap.dev.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["spec"]["versions"][0]["additionalPrinterColumns"].append(
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy", "priority": 1}
    )
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    # --force-conflicts: on this shared cluster the CRDs were last written by other tests' client
    # (field manager "OpenAPI-Generator"); Helm 4 applies server-side and takes those fields over only
    # when told to (the chart README's adoption note says the same for CRDs applied by other tools).
    helm(
        "upgrade",
        RELEASE,
        str(changed),
        "-n",
        namespace,
        "-f",
        str(values),
        "--force-conflicts",
        "--wait=watcher",
        "--timeout",
        "3m",
        env=helm_env,
        timeout=240,
    )
    columns = ext.read_custom_resource_definition("weightversions.hotswap.dev").spec.versions[0]
    assert "Strategy" in [c.name for c in columns.additional_printer_columns]
    lease = coord.read_namespaced_lease(FULLNAME, namespace)
    assert lease.spec is not None and lease.spec.holder_identity  # the upgrade's merge kept the holder

    # Pools go before the operator: their finalizer is the operator's to remove.
    for plural in ("weightversions", "inferencepools"):
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, plural)
    waiter.until(
        lambda: (
            not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools")["items"]
        ),
        "pools deleted (operator removed its finalizer)",
        timeout=60,
    )

    manifest: list[Obj] = [
        d
        for d in yaml.safe_load_all(helm("get", "manifest", RELEASE, "-n", namespace, env=helm_env).stdout)
        if d
    ]
    helm("uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "2m", env=helm_env, timeout=180)

    readers: dict[str, tuple[Any, bool]] = {
        "ServiceAccount": (core.read_namespaced_service_account, True),
        "Service": (core.read_namespaced_service, True),
        "Deployment": (apps.read_namespaced_deployment, True),
        "Lease": (coord.read_namespaced_lease, True),
        "Role": (rbac.read_namespaced_role, True),
        "RoleBinding": (rbac.read_namespaced_role_binding, True),
        "ClusterRole": (rbac.read_cluster_role, False),
        "ClusterRoleBinding": (rbac.read_cluster_role_binding, False),
    }

    def leftovers() -> list[str]:
        left = []
        for d in manifest:
            kind, name = d["kind"], d["metadata"]["name"]
            if kind == "CustomResourceDefinition":
                continue  # kept on purpose (helm.sh/resource-policy: keep), checked below
            assert kind in readers, f"the test does not know how to look for a {kind}"
            read, namespaced = readers[kind]
            try:
                read(name, d["metadata"].get("namespace", namespace)) if namespaced else read(name)
                left.append(f"{kind}/{name}")
            except client.ApiException as e:
                if e.status != 404:
                    raise
        pods = [p.metadata.name for p in waiter.pods(f"app.kubernetes.io/instance={RELEASE}")]
        return left + [f"Pod/{p}" for p in pods]

    wait_for(lambda: not leftovers(), 60, "everything of the release gone", lambda: str(leftovers()))
    assert {d["kind"] for d in manifest} >= {"Deployment", "Lease", "Role", "RoleBinding", "ServiceAccount"}
    for name in CRD_NAMES:
        ext.read_custom_resource_definition(name)  # still there: keep
    wait_for(
        lambda: not pod_processes(namespace=namespace),
        10,
        "the operator's process gone after the uninstall",
        lambda: str(pod_processes(namespace=namespace)),
    )
