"""API objects → planner views; the Lease decisions; the metrics derived from plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hotswap_api import protocol
from hotswap_operator import snapshot
from hotswap_operator.lease import Observed, decide
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.planner import plan
from prometheus_client import CollectorRegistry

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def pod_obj(name: str, *, ip: str | None = "127.0.0.11", phase: str = "Running", **kw: Any) -> dict[str, Any]:
    conditions = [
        {"type": "Ready", "status": "True" if kw.get("ready", True) else "False"},
        {"type": "ContainersReady", "status": "True"},
    ]
    if "gate" in kw:
        conditions.append({"type": "hotswap.dev/weights-ready", "status": "True" if kw["gate"] else "False"})
    meta: dict[str, Any] = {
        "name": name,
        "creationTimestamp": "2026-11-30T12:00:00Z",
        "labels": {"hotswap.dev/pool": "llm", **kw.get("labels", {})},
    }
    if kw.get("deleting"):
        meta["deletionTimestamp"] = "2026-11-30T12:01:00Z"
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


POOL = {
    "apiVersion": "hotswap.dev/v1alpha1",
    "kind": "InferencePool",
    "metadata": {"name": "llm", "namespace": "ml", "generation": 4, "uid": "u"},
    "spec": {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "vllm", "image": "i"}]}},
        "model": {"path": "base"},
        "checkpointVolume": {"source": {"hostPath": {"path": "/data"}}},
        "engine": {"device": "CPU"},
    },
    "status": {"currentVersion": "v1", "currentSource": {"path": "ckpts/v1"}, "conditions": []},
}


def wv_obj(
    name: str, pool: str, version: str, created: str, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": created, "generation": 1},
        "spec": {"poolRef": {"name": pool}, "version": version, "source": {"path": f"ckpts/{version}"}},
        "status": status or {},
    }


def test_pod_view_reads_phase_ip_gate_label_and_deletion() -> None:
    v = snapshot.pod_view(pod_obj("a", gate=False, labels={"hotswap.dev/weight-version": "v1"}), None)
    assert (v.name, v.ip, v.running, v.ready, v.gate, v.label_version, v.deleting) == (
        "a",
        "127.0.0.11",
        True,
        True,
        False,
        "v1",
        False,
    )
    assert v.created == T0
    fresh = snapshot.pod_view(pod_obj("b", ip=None, phase="Pending", ready=False), None)
    assert (fresh.ip, fresh.running, fresh.ready, fresh.gate, fresh.label_version) == (
        None,
        False,
        False,
        None,
        None,
    )
    assert snapshot.pod_view(pod_obj("c", deleting=True), None).deleting


def test_only_running_pods_with_an_ip_are_polled() -> None:
    assert snapshot.pollable(pod_obj("a"))
    assert not snapshot.pollable(pod_obj("a", ip=None))
    assert not snapshot.pollable(pod_obj("a", phase="Pending"))
    assert not snapshot.pollable(pod_obj("a", deleting=True))


def test_fleet_keeps_only_the_pools_versions() -> None:
    objs = [
        wv_obj("llm-v2", "llm", "v2", "2026-11-30T12:05:00Z", {"phase": "Staging"}),
        wv_obj("other-v9", "other", "v9", "2026-11-30T12:06:00Z"),
    ]
    status = protocol.AgentStatus(pod="a", serving_version="v1", ready=True)
    f = snapshot.fleet(POOL, [pod_obj("a")], {"a": status}, objs, T0)
    assert f.pool == "llm" and f.generation == 4
    assert f.status.current_version == "v1"
    assert [v.name for v in f.versions] == ["llm-v2"]
    assert f.versions[0].created == T0 + timedelta(minutes=5)
    assert f.versions[0].status.phase.value == "Staging"
    assert f.pods[0].agent == status and f.pods[0].serving == "v1"


# ---- leases --------------------------------------------------------------------------------------------


def lease(holder: str | None, renew: str = "2026-11-30T12:00:00.000000Z", rv: str = "7") -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "hotswap-operator", "namespace": "ops", "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "renewTime": renew,
            "leaseTransitions": 2,
        },
    }


def test_free_lease_is_created() -> None:
    d = decide(None, "me", "ops", "hotswap-operator", 15, T0, 100.0, None)
    assert d.action == "create" and d.body is not None
    assert d.body["spec"]["holderIdentity"] == "me"
    assert d.body["spec"]["renewTime"] == "2026-11-30T12:00:00.000000Z"


def test_holder_renews_with_the_resource_version_it_read() -> None:
    d = decide(lease("me"), "me", "ops", "hotswap-operator", 15, T0 + timedelta(seconds=5), 100.0, None)
    assert d.action == "renew" and d.body is not None
    assert d.body["metadata"]["resourceVersion"] == "7"  # optimistic: a racing writer gets 409
    assert d.body["spec"]["renewTime"] == "2026-11-30T12:00:05.000000Z"


def test_follower_waits_until_the_record_is_stale_on_its_own_clock() -> None:
    held = lease("other")
    first = decide(held, "me", "ops", "hotswap-operator", 15, T0, 100.0, None)
    assert first.action == "wait" and first.observed == Observed(("other", held["spec"]["renewTime"]), 100.0)
    # 10 s later on our clock, same record: still theirs
    assert decide(held, "me", "ops", "hotswap-operator", 15, T0, 110.0, first.observed).action == "wait"
    # the holder renewed: the record changed, the clock restarts
    renewed = lease("other", renew="2026-11-30T12:00:12.000000Z")
    again = decide(renewed, "me", "ops", "hotswap-operator", 15, T0, 114.0, first.observed)
    assert again.action == "wait" and again.observed is not None and again.observed.since == 114.0
    # no change for a whole duration: take it, counting a transition
    taken = decide(renewed, "me", "ops", "hotswap-operator", 15, T0, 130.0, again.observed)
    assert taken.action == "take" and taken.body is not None
    assert taken.body["spec"]["holderIdentity"] == "me" and taken.body["spec"]["leaseTransitions"] == 3


def test_released_lease_is_taken_at_once() -> None:
    d = decide(lease(None), "me", "ops", "hotswap-operator", 15, T0, 100.0, None)
    assert d.action == "take" and d.body is not None and d.body["spec"]["leaseTransitions"] == 2


# ---- metrics -------------------------------------------------------------------------------------------


def sample(m: OperatorMetrics, name: str, labels: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_metrics_follow_pods_and_completed_rollouts() -> None:
    m = OperatorMetrics(CollectorRegistry())
    done = protocol.UpdateProgress(
        id="u",
        version="v2",
        mode=protocol.UpdateMode.BROADCAST,
        stage=protocol.UpdateStage.COMPLETE,
        started_at=T0,
        finished_at=T0,
        durations={"transfer": 1.5, "reload": 0.5},
    )
    agents = {
        n: protocol.AgentStatus(pod=n, serving_version="v2", ready=True, update=done) for n in ("a", "b")
    }
    status = {
        "phase": "Updating",
        "startTime": "2026-11-30T12:00:00Z",
        "stageDurations": {"staging": 2.0},
        "rollout": {
            "members": [
                {"pod": "a", "rank": 0, "address": "127.0.0.11"},
                {"pod": "b", "rank": 1, "address": "127.0.0.12"},
            ]
        },
    }
    pods = [pod_obj("a", gate=True), pod_obj("b", ip="127.0.0.12", gate=True)]
    f = snapshot.fleet(
        POOL,
        pods,
        agents,
        [wv_obj("llm-v2", "llm", "v2", "2026-11-30T12:00:00Z", status)],
        T0 + timedelta(seconds=9),
    )
    p = plan(f)
    assert p.version_statuses["llm-v2"].phase.value == "Complete"
    m.observe("ml", f, p)
    assert sample(m, "hotswap_operator_rollouts_total", {"phase": "Complete"}) == 1
    assert sample(m, "hotswap_operator_rollout_stage_seconds_sum", {"stage": "transfer"}) == 1.5
    assert sample(m, "hotswap_operator_rollout_stage_seconds_sum", {"stage": "staging"}) == 2.0
    assert sample(m, "hotswap_operator_rollout_stage_seconds_sum", {"stage": "total"}) == 9.0
    assert (
        sample(m, "hotswap_operator_pods_serving", {"namespace": "ml", "pool": "llm", "version": "v2"}) == 2
    )
    # the pods move on: the old version's series goes away
    agents = {n: protocol.AgentStatus(pod=n, serving_version="v3", ready=True) for n in ("a", "b")}
    f2 = snapshot.fleet(POOL, pods, agents, [], T0)
    m.observe("ml", f2, plan(f2))
    assert (
        sample(m, "hotswap_operator_pods_serving", {"namespace": "ml", "pool": "llm", "version": "v2"})
        is None
    )
    assert (
        sample(m, "hotswap_operator_pods_serving", {"namespace": "ml", "pool": "llm", "version": "v3"}) == 2
    )
    m.forget_pool("ml", "llm")
    assert (
        sample(m, "hotswap_operator_pods_serving", {"namespace": "ml", "pool": "llm", "version": "v3"})
        is None
    )


def test_failures_are_counted_by_reason() -> None:
    m = OperatorMetrics(CollectorRegistry())
    status = {"phase": "Staging", "startTime": "2026-11-30T11:00:00Z", "rollout": {"members": []}}
    wv = wv_obj("llm-v2", "llm", "v2", "2026-11-30T11:00:00Z", status)
    f = snapshot.fleet(POOL, [], {}, [wv], T0)
    p = plan(f)
    assert p.version_statuses["llm-v2"].phase.value == "Failed"
    m.observe("ml", f, p)
    assert sample(m, "hotswap_operator_rollout_failures_total", {"reason": "Timeout"}) == 1
    assert sample(m, "hotswap_operator_rollouts_total", {"phase": "Failed"}) == 1
