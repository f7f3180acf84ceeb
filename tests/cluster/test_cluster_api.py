"""Acceptance: the apiserver's own schema/CEL validation and RBAC, and the local node."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable

import pytest
from hotswap_cluster.waiting import Waiter, wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster


def test_crd_schema_and_cel_rule_reject_invalid_object(kube_api: client.ApiClient, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    group = f"t{uuid.uuid4().hex[:6]}.hotswap.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"ranges.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["min", "max"],
                                    "properties": {
                                        "min": {"type": "integer", "minimum": 0},
                                        "max": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            got = ext.read_custom_resource_definition(f"ranges.{group}")
            return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

        wait_for(established, 30, "CRD established")

        def obj(name: str, lo: object, hi: object) -> dict[str, object]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Range",
                "metadata": {"name": name},
                "spec": {"min": lo, "max": hi},
            }

        def create(body: dict[str, object]) -> object:
            return custom.create_namespaced_custom_object(group, "v1", namespace, "ranges", body)

        # The discovery of a new CRD can lag Established by a moment: retry the valid create.
        wait_for(lambda: create(obj("ok", 1, 2)), 30, "valid object created")
        with pytest.raises(client.ApiException) as cel:
            create(obj("bad", 5, 2))
        assert cel.value.status == 422
        assert "min must not exceed max" in cel.value.body
        with pytest.raises(client.ApiException) as schema:
            create(obj("neg", -1, 2))
        assert schema.value.status == 422
        assert "should be greater than or equal to 0" in schema.value.body
    finally:
        ext.delete_custom_resource_definition(f"ranges.{group}")


def test_service_account_without_permissions_gets_403(
    kube_api: client.ApiClient, namespace: str, sa_client: Callable[..., client.ApiClient]
) -> None:
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="limited"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="read-configmaps"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="limited-read-configmaps"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="read-configmaps"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="limited", namespace=namespace)],
        ),
    )
    as_sa = client.CoreV1Api(sa_client("limited"))
    review = client.AuthenticationV1Api(sa_client("limited")).create_self_subject_review(
        client.V1SelfSubjectReview()
    )
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:limited"
    # Granted: works (RBAC may take a moment to see the new binding).
    wait_for(
        lambda: as_sa.list_namespaced_config_map(namespace) is not None,
        20,
        "configmaps readable with the grant",
    )
    for call in (
        lambda: as_sa.list_namespaced_secret(namespace),
        lambda: as_sa.list_namespaced_pod(namespace),
        lambda: as_sa.list_namespaced_config_map("default"),
    ):
        with pytest.raises(client.ApiException) as denied:
            call()
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:limited" in denied.value.body


def test_node_advertises_gpus_and_unfit_pod_stays_pending(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter
) -> None:
    core = client.CoreV1Api(kube_api)
    node = core.read_node("hotswap-node")
    gpus = int(node.status.allocatable["nvidia.com/gpu"])
    assert gpus >= 1
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert not [t for t in node.spec.taints or [] if t.effect in ("NoSchedule", "NoExecute")]
    container = client.V1Container(
        name="c",
        image="x",
        command=[sys.executable, "-c", "import time; time.sleep(3600)"],
        resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus + 1)}),
    )
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="too-big"), spec=client.V1PodSpec(containers=[container])
        ),
    )

    def unschedulable() -> bool:
        conds = {c.type: c for c in waiter.pod("too-big").status.conditions or []}
        return "PodScheduled" in conds and conds["PodScheduled"].reason == "Unschedulable"

    waiter.until(unschedulable, "PodScheduled=False Unschedulable")
    p = waiter.pod("too-big")
    assert p.spec.node_name is None and p.status.phase == "Pending"
    assert "Insufficient nvidia.com/gpu" in next(
        c.message for c in p.status.conditions if c.type == "PodScheduled"
    )
