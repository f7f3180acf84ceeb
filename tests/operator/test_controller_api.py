"""The pool controller and the leader election against the real apiserver (no agents, no engines).

The pods of these pools never get scheduled (their template asks for a node label no node has), so
what is checked is the operator's side of the API: the Deployment and Secret it owns, the statuses it
writes, the events, the /scale path, a version completing on an empty pool, and the Lease.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from bodies import GROUP, VERSION, pool_body
from hotswap_operator.controller import PoolController, Runtime
from hotswap_operator.kube import Kube
from hotswap_operator.lease import LeaderElector, LeadershipLost
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.settings import OperatorSettings
from hotswap_testing.waiting import wait_for_async
from kubernetes import client

pytestmark = pytest.mark.cluster
MERGE = "application/merge-patch+json"


def get(custom: client.CustomObjectsApi, ns: str, plural: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
    return out


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj.get("status", {}).get("conditions", [])}


def warnings(api: client.ApiClient, ns: str, kind: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of the Warning Events on one object, oldest first."""
    evs = client.CoreV1Api(api).list_namespaced_event(ns).items
    mine = [
        e
        for e in evs
        if e.involved_object.kind == kind and e.involved_object.name == name and e.type == "Warning"
    ]
    mine.sort(key=lambda e: (e.first_timestamp, e.metadata.creation_timestamp, e.metadata.name))
    return [(e.reason, e.message) for e in mine]


async def test_pool_owns_its_workload_and_reports_status(
    kube_api: client.ApiClient, namespace: str, crds: None
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    pool = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", pool_body(0))
    ctl = PoolController(
        Runtime(kube=Kube(kube_api), metrics=OperatorMetrics(), settings=OperatorSettings()),
        namespace,
        "chat",
    )
    try:
        await ctl.reconcile()
        dep = apps.read_namespaced_deployment("chat", namespace)
        (owner,) = dep.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller) == (
            "InferencePool",
            "chat",
            pool["metadata"]["uid"],
            True,
        )
        assert dep.spec.replicas == 0
        assert [c.name for c in dep.spec.template.spec.containers] == ["vllm", "hotswap-engine"]
        assert dep.spec.template.spec.readiness_gates[0].condition_type == "hotswap.dev/weights-ready"
        secret = core.read_namespaced_secret("chat-agent-token", namespace)
        assert len(base64.b64decode(secret.data["token"])) >= 32
        assert secret.metadata.owner_references[0].uid == pool["metadata"]["uid"]
        st = get(custom, namespace, "inferencepools", "chat")["status"]
        assert st["selector"] == "hotswap.dev/pool=chat" and st["observedGeneration"] == 1
        assert conditions({"status": st})["Available"] == ("True", "ReplicasReady")

        # A version on an empty pool completes at once and becomes current.
        wv = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WeightVersion",
            "metadata": {"name": "chat-v1"},
            "spec": {"poolRef": {"name": "chat"}, "version": "v1", "source": {"path": "ckpts/v1"}},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv)
        await ctl.reconcile()
        got = get(custom, namespace, "weightversions", "chat-v1")
        assert got["status"]["phase"] == "Complete"
        assert conditions(got)["Applied"] == ("True", "Applied")
        assert get(custom, namespace, "inferencepools", "chat")["status"]["currentVersion"] == "v1"
        events = core.list_namespaced_event(namespace).items
        reasons = {(e.involved_object.name, e.reason) for e in events}
        assert {("chat-v1", "Accepted"), ("chat-v1", "Complete"), ("chat", "VersionChanged")} <= reasons

        # /scale changes the pool; the next look changes the Deployment; the pods are counted.
        custom.patch_namespaced_custom_object_scale(
            GROUP,
            VERSION,
            namespace,
            "inferencepools",
            "chat",
            {"spec": {"replicas": 2}},
            _content_type=MERGE,
        )
        await ctl.reconcile()
        assert apps.read_namespaced_deployment("chat", namespace).spec.replicas == 2

        async def counted() -> dict[str, Any] | None:
            await ctl.reconcile()
            st: dict[str, Any] = get(custom, namespace, "inferencepools", "chat")["status"]
            return st if st["replicas"] == 2 else None

        st = await wait_for_async(counted, 30, "the pool's status counting 2 pods", interval=0.5)
        assert st["readyReplicas"] == 0 and st["observedGeneration"] == 2
        assert conditions({"status": st})["Available"] == ("False", "NoReplicasReady")
        assert conditions({"status": st})["Progressing"][0] == "True"
    finally:
        await ctl.close()


async def test_only_one_replica_holds_the_lease(kube_api: client.ApiClient, namespace: str) -> None:
    kube = Kube(kube_api)
    a = LeaderElector(kube, namespace, "hotswap-operator", "replica-a", duration_s=2)
    b = LeaderElector(kube, namespace, "hotswap-operator", "replica-b", duration_s=2)
    await asyncio.wait_for(a.acquire(), 10)
    keeper = asyncio.create_task(a.hold())
    # b looks again and again (each look one decision) while a renews every 2/3 s: b sees the record
    # change and waits, for longer than a lease duration (5 records seen: a renewed 4 times, >= 2.6 s).
    coord = client.CoordinationV1Api(kube_api)
    records: set[Any] = set()

    async def b_waits_through_renewals() -> bool:
        assert not await b._try(), "replica-b took the lease from a replica-a that renews it"
        lease = coord.read_namespaced_lease("hotswap-operator", namespace)
        assert lease.spec.holder_identity == "replica-a", lease.spec
        records.add(lease.spec.renew_time)
        return len(records) >= 5

    await wait_for_async(b_waits_through_renewals, 15, "replica-a renewing 4 times while replica-b looks")
    keeper.cancel()  # a stops renewing (a crashed leader)
    started = time.monotonic()
    await asyncio.wait_for(b.acquire(), 10)
    assert time.monotonic() - started >= 1.0  # only after the record stayed unchanged for a duration
    lease = client.CoordinationV1Api(kube_api).read_namespaced_lease("hotswap-operator", namespace)
    assert lease.spec.holder_identity == "replica-b" and lease.spec.lease_transitions == 1
    with pytest.raises(LeadershipLost, match="lost lease"):
        await asyncio.wait_for(a.hold(), 10)  # a wakes up: it must stop acting


async def test_versions_created_within_a_second_end_on_the_last_created(
    kube_api: client.ApiClient, namespace: str, crds: None
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", pool_body(0))
    ctl = PoolController(
        Runtime(kube=Kube(kube_api), metrics=OperatorMetrics(), settings=OperatorSettings()),
        namespace,
        "chat",
    )
    # A trainer publishing quickly: r1..r12 (r10 < r9 as strings), most within the same second.
    names = [f"r{i}" for i in range(1, 13)]
    for version in names:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WeightVersion",
            "metadata": {"name": f"chat-{version}"},
            "spec": {"poolRef": {"name": "chat"}, "version": version, "source": {"path": f"ckpts/{version}"}},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", body)
    try:
        await ctl.reconcile()
        got = {v: get(custom, namespace, "weightversions", f"chat-{v}")["status"] for v in names}
        assert [got[v]["sequence"] for v in names] == list(range(1, 13))
        assert got["r12"]["phase"] == "Complete"  # an empty pool takes the target at once
        assert {got[v]["phase"] for v in names[:-1]} == {"Superseded"}
        assert get(custom, namespace, "inferencepools", "chat")["status"]["currentVersion"] == "r12"
    finally:
        await ctl.close()


async def test_versions_of_a_pool_with_an_invalid_template_end_at_their_timeout(
    kube_api: client.ApiClient, namespace: str, crds: None
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    body = pool_body(0)
    body["spec"]["template"]["spec"]["containers"].append({"name": "hotswap-engine", "image": "x"})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", body)
    wv = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightVersion",
        "metadata": {"name": "chat-r1"},
        "spec": {
            "poolRef": {"name": "chat"},
            "version": "r1",
            "source": {"path": "ckpts/r1"},
            "timeout": "2s",
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv)
    ctl = PoolController(
        Runtime(kube=Kube(kube_api), metrics=OperatorMetrics(), settings=OperatorSettings()),
        namespace,
        "chat",
    )

    async def failed() -> dict[str, Any] | None:
        await ctl.reconcile()
        st: dict[str, Any] = get(custom, namespace, "weightversions", "chat-r1").get("status") or {}
        return st if st.get("phase") == "Failed" else None

    try:
        requeue = await ctl.reconcile()
        assert requeue <= 3.5  # it looks again right after the version's deadline
        pool = get(custom, namespace, "inferencepools", "chat")
        assert conditions(pool)["Degraded"] == ("True", "InvalidTemplate")
        st = await wait_for_async(failed, 15, "the version failing at its timeout", interval=0.5)
        assert "timed out after 2s" in st["message"] and "invalid template" in st["message"]
        assert conditions(get(custom, namespace, "weightversions", "chat-r1"))["Applied"] == (
            "False",
            "InvalidTemplate",
        )
        await ctl.reconcile()  # the pool stays invalid: no new Event for the same condition
        # Warning Events, once each: on the pool when it turned Degraded, on the version when it
        # was held by the template and when it failed.
        degraded = next(c for c in pool["status"]["conditions"] if c["type"] == "Degraded")
        assert warnings(kube_api, namespace, "InferencePool", "chat") == [
            ("InvalidTemplate", degraded["message"])
        ]
        wv_events = warnings(kube_api, namespace, "WeightVersion", "chat-r1")
        assert [r for r, _ in wv_events] == ["InvalidTemplate", "Failed"], wv_events
        assert "invalid template" in wv_events[0][1] and "timed out after 2s" in wv_events[1][1]
    finally:
        await ctl.close()
