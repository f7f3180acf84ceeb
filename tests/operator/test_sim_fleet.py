"""Rollouts on a simulated fleet: pods on the local cluster whose engine container is the agent
STAND-IN (`hotswap_testing.sim_agent`: the agent's API and long-poll, simulated step times, failures
on command) and whose inference container only sleeps. Everything else is real: the pool controller's
loop (woken by the agents' long-polls), the apiserver, the controller-manager (Deployment,
ReplicaSet) and the kubelet stand-in running the pods as processes.

A 20-pod rollout completes; failures injected into the stand-ins drive the operator's paths: a
transient Stage error is retried with backoff, an update that fails on one member ends the attempt
and a new group succeeds, a checkpoint mismatch fails the version at once with every pod still
serving the old one, and failing every attempt ends in AttemptsExhausted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hotswap_api.errors import ErrorCode
from hotswap_api.protocol import UpdateStage
from hotswap_operator.controller import PoolController, Runtime
from hotswap_operator.kube import Kube
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.settings import OperatorSettings
from hotswap_testing import sim_fleet
from hotswap_testing.sim_agent import SimFault, SimTimes
from hotswap_testing.waiting import wait_for_async
from kubernetes import client

pytestmark = pytest.mark.cluster
GROUP, VERSION = sim_fleet.GROUP, sim_fleet.VERSION
TIMES = SimTimes(stage=0.2, connect=0.05, transfer=0.3, reload=0.1, p2p=0.2)


class SimPool:
    """One simulated pool and its controller loop running in the background."""

    def __init__(self, kube_api: client.ApiClient, namespace: str, name: str) -> None:
        self.custom = client.CustomObjectsApi(kube_api)
        self.core = client.CoreV1Api(kube_api)
        self.namespace, self.name = namespace, name
        # Driven without kopf, no watch wakes the loop on a new pod or WeightVersion: the safety-net
        # interval of 1 s stands in for it (the agents' long-polls still wake it on their changes).
        settings = OperatorSettings(
            **sim_fleet.operator_commands(TIMES), action_backoff_base=0.2, active_requeue=1, idle_requeue=1
        )
        self.metrics = OperatorMetrics()
        self.ctl = PoolController(Runtime(Kube(kube_api), self.metrics, settings), namespace, name)
        self.task: asyncio.Task[None] | None = None

    def get(self, plural: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )
        return out

    def pool_status(self) -> dict[str, Any]:
        return self.get("inferencepools", self.name).get("status") or {}

    def version(self, v: str) -> dict[str, Any]:
        return self.get("weightversions", f"{self.name}-{v}").get("status") or {}

    def create_version(self, v: str) -> None:
        body = sim_fleet.wv_body(self.name, v, timeout="2m")
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "weightversions", body)
        self.ctl.wake.set()

    def endpoints(self) -> dict[str, str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"hotswap.dev/pool={self.name}")
        return {p.metadata.name: f"http://{p.status.pod_ip}:8600" for p in pods.items if p.status.pod_ip}

    def token(self) -> str:
        secret = self.core.read_namespaced_secret(f"{self.name}-agent-token", self.namespace)
        return sim_fleet.token_of(secret.data)

    def explain(self) -> str:
        return f"pool status: {self.pool_status()}"

    async def until(self, check: Callable[[], Any], what: str, timeout: float) -> Any:
        """Wait on `check` (blocking API calls: run in a thread, so the controller loop keeps going)."""

        async def probe() -> Any:
            return await asyncio.to_thread(check)

        return await wait_for_async(probe, timeout, what, explain=self.explain, interval=0.2)

    async def phase(self, v: str, want: str, timeout: float = 60) -> dict[str, Any]:
        st: dict[str, Any] = await self.until(
            lambda: (s := self.version(v)).get("phase") == want and s, f"{v} {want}", timeout
        )
        return st


@contextlib.asynccontextmanager
async def sim_pool(
    kube_api: client.ApiClient, namespace: str, replicas: int, max_attempts: int = 3
) -> AsyncIterator[SimPool]:
    pool = SimPool(kube_api, namespace, "sim")
    body = sim_fleet.pool_body("sim", replicas, max_attempts=max_attempts)
    pool.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", body)
    pool.task = asyncio.create_task(pool.ctl.run())
    try:
        # Every pod up, its agent heard from and its readiness gate set: serving the base version.
        await pool.until(
            lambda: pool.pool_status().get("readyReplicas") == replicas, f"{replicas} ready pods", 150
        )
        yield pool
    finally:
        pool.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pool.task


async def test_twenty_pod_rollout_completes(kube_api: client.ApiClient, namespace: str, crds: None) -> None:
    async with sim_pool(kube_api, namespace, 20) as pool:
        pool.create_version("v1")
        st = await pool.phase("v1", "Complete", timeout=90)
        assert st["updatedReplicas"] == 20 and st["rollout"]["attempt"] == 1, st
        assert len(st["rollout"]["members"]) == 20  # one broadcast group of every pod, part i of 20
        # The pool's status follows in a later reconcile (pods' readiness gates, then the kubelet's
        # Ready): wait for it rather than read it once.
        want = ("v1", 20, 20)
        ps = await pool.until(
            lambda: (
                (s := pool.pool_status())
                and (s.get("currentVersion"), s.get("updatedReplicas"), s.get("readyReplicas")) == want
                and s
            ),
            "the pool's status: v1 on 20 updated and 20 ready replicas",
            90,
        )
        assert ps["currentVersion"] == "v1", ps
        token = pool.token()
        served = {sim_fleet.status(ep, token).serving_version for ep in pool.endpoints().values()}
        assert served == {"v1"}
        labels = {
            p.metadata.labels["hotswap.dev/weight-version"]
            for p in pool.core.list_namespaced_pod(namespace, label_selector="hotswap.dev/pool=sim").items
        }
        assert labels == {"v1"}
        # Each agent was asked to stage and update once: no request storm per pod.
        stage_ok = pool.metrics.actions.labels("stage", "ok")._value.get()
        update_ok = pool.metrics.actions.labels("StartUpdate", "ok")._value.get()
        assert (stage_ok, update_ok) == (20, 20)


async def test_injected_failures_drive_retry_and_fail_paths(
    kube_api: client.ApiClient, namespace: str, crds: None
) -> None:
    async with sim_pool(kube_api, namespace, 3, max_attempts=2) as pool:
        token = pool.token()
        pods = sorted(pool.endpoints().items())
        (_, ep0), (_, ep1), (_, ep2) = pods

        # A transient Stage error (500 Internal) on one pod: retried after the backoff, then Complete.
        sim_fleet.inject(ep0, token, SimFault(action="Stage", code=ErrorCode.INTERNAL, version="v1"))
        pool.create_version("v1")
        st = await pool.phase("v1", "Complete")
        assert st["rollout"]["attempt"] == 1, st
        assert pool.metrics.actions.labels("stage", "error")._value.get() == 1
        assert pool.metrics.actions.labels("stage", "ok")._value.get() == 3

        # A member's update fails (it rolls back): the attempt ends, a new group succeeds.
        sim_fleet.inject(ep1, token, SimFault(action="Update", at=UpdateStage.TRANSFERRING, version="v2"))
        pool.create_version("v2")
        st = await pool.phase("v2", "Complete")
        assert st["rollout"]["attempt"] == 2, st
        events = pool.core.list_namespaced_event(namespace).items
        retrying = [e.message for e in events if (e.reason, e.involved_object.name) == ("Retrying", "sim-v2")]
        assert any("simulated failure while Transferring" in m for m in retrying), retrying

        # A checkpoint mismatch (permanent) fails the version at once; every pod keeps serving v2.
        sim_fleet.inject(ep2, token, SimFault(action="Stage", code=ErrorCode.CHECKPOINT_MISMATCH))
        pool.create_version("v3")
        st = await pool.phase("v3", "Failed")
        applied = next(c for c in st["conditions"] if c["type"] == "Applied")
        assert applied["reason"] == "CheckpointInvalid" and "CheckpointMismatch" in applied["message"], st
        assert pool.pool_status()["currentVersion"] == "v2"
        assert {sim_fleet.status(ep, token).serving_version for _, ep in pods} == {"v2"}

        # A member failing every attempt: the version fails after maxAttempts (2), the pool stays on v2.
        sim_fleet.inject(ep0, token, SimFault(action="Update", at=UpdateStage.CONNECTING, times=2))
        pool.create_version("v4")
        st = await pool.phase("v4", "Failed")
        applied = next(c for c in st["conditions"] if c["type"] == "Applied")
        assert applied["reason"] == "AttemptsExhausted", st
        assert pool.pool_status()["currentVersion"] == "v2"
        ready = await pool.until(lambda: pool.pool_status().get("readyReplicas") == 3, "3 pods ready", 30)
        assert ready
