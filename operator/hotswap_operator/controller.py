"""One InferencePool's reconcile loop: read the fleet, ask the planner, write statuses, run the actions.

Order matters for restarts: statuses are written *before* actions run (the pool's first), so the
group an agent is told about is already recorded when it starts acting; a restarted operator
re-derives the same actions from the same status and the agents' own state (stage and update
requests are idempotent or answer 409 when already running).

What a reconcile reads costs no LIST: the pool's pods and WeightVersions come from kopf's
watch-fed indices (`watched`), each agent's status from its pod's long-poll (`agent_watch`), which
wakes the loop when the agent's state changes. The loop therefore runs on events — a watch event,
an agent's change, a finished Stage call — and otherwise only when the plan says a backoff or a
deadline is due, or at the planner's long safety-net interval.

Staging can take minutes, so Stage calls run as background tasks (at most one per pod and version)
that wake the loop when they end. Errors from Stage and StartUpdate requests come back into every
plan as `ActionFailure`s, kept per (pod, version) until such a request succeeds: permanent ones (a
missing or mismatching checkpoint, a forbidden or invalid path) fail the WeightVersion, any other (an
agent's 500, a timeout, an unreachable agent) is retried with exponential backoff (`planner.backoff_s`)
and shows in the WeightVersion's status message meanwhile.

A pool whose template is invalid gets no plan; its WeightVersions still end at their timeout
(`planner.invalid_pool_status`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hotswap_api import protocol
from hotswap_api.labels import READINESS_GATE, SPEC_HASH, VERSION_LABEL
from hotswap_api.resources import ConditionStatus, InferencePool

from hotswap_operator import history, planner, snapshot
from hotswap_operator.agent_watch import LONG_POLL_S, AgentWatch
from hotswap_operator.agents import AgentClient, AgentClientError, AgentConflict, AgentNotFound
from hotswap_operator.kube import Kube, api_status
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.planner import ActionFailure, Plan
from hotswap_operator.settings import OperatorSettings
from hotswap_operator.watched import FleetReader, ListReader
from hotswap_operator.workload import (
    TOKEN_KEY,
    WorkloadError,
    build_deployment,
    build_token_secret,
    token_secret_name,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]
COMPONENT = "hotswap-operator"
# The token Secret and the Deployment are the operator's own objects; a reconcile re-reads them at most
# this often while nothing of ours changed them (a publish runs 5-8 reconciles in a second or two, and
# each GET is a round trip through a busy apiserver: the control overhead #11 item 4 measures).
OWNED_RECHECK_S = 10.0


@dataclass
class Runtime:
    """What every pool loop shares: the clients and the operator's settings."""

    kube: Kube
    metrics: OperatorMetrics
    settings: OperatorSettings
    # Where pods and WeightVersions are read from: kopf's watch-fed indices once the handlers run
    # (`handlers` sets it); LIST calls when None (a controller driven without kopf).
    reader: FleetReader | None = None
    agent_long_poll_s: float = LONG_POLL_S


def spec_hash(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class PoolController:
    def __init__(self, rt: Runtime, namespace: str, name: str) -> None:
        self.rt = rt
        self.namespace = namespace
        self.name = name
        self.wake = asyncio.Event()
        self._failures: dict[tuple[str, str], ActionFailure] = {}  # by (pod, version)
        self._staging: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._client: AgentClient | None = None
        self._token_checked: tuple[str, float] | None = None  # (pool uid, monotonic time) of the last GET
        self._deployment_checked: tuple[str, float] | None = None  # (spec hash, monotonic time)
        self._token: str | None = None
        self._watches: dict[str, AgentWatch] = {}  # by pod: its agent's status, long-polled
        self._book = history.VersionBook(name)

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled; `wake` cuts a wait short (an event on the pool, its pods or
        versions, an agent's change, or a finished staging call)."""
        try:
            while True:
                # Cleared before the reconcile, not after: a wake that comes while it runs (an
                # agent finished meanwhile) makes the next one start at once instead of being lost.
                self.wake.clear()
                try:
                    delay = await self.reconcile()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reconciling pool %s/%s", self.namespace, self.name)
                    delay = 5.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)
        finally:
            await self.close()

    async def close(self) -> None:
        for task in self._staging.values():
            task.cancel()
        self._staging.clear()
        for watch in self._watches.values():
            await watch.stop()
        self._watches.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def reconcile(self) -> float:
        self.rt.metrics.reconciles.inc()
        with self.rt.metrics.reconcile_seconds.time():
            return await self._reconcile()

    async def _reconcile(self) -> float:
        kube = self.rt.kube
        pool = await kube.get_pool(self.namespace, self.name)
        if pool is None:
            return 30.0
        uid = pool["metadata"]["uid"]
        client = await self._agent_client(uid)
        parsed = InferencePool.model_validate(pool)
        try:
            settings = self.rt.settings
            desired = build_deployment(
                parsed.spec,
                self.name,
                self.namespace,
                uid,
                settings.gpu_sharing,
                (tuple(settings.engine_command), tuple(settings.inference_command)),
            )
        except WorkloadError as e:
            await self._degraded(pool, "InvalidTemplate", str(e))
            return await self._invalid_template(str(e))
        await self._ensure_deployment(desired)

        reader = self._reader()
        pods = await reader.pods(self.namespace, self.name)
        versions = await reader.versions(self.namespace, self.name)
        agents = await self._agents(client, pods, parsed.spec.engine.port)
        # The plan reads the window of the history it can act on (`history`): a pool with 1,000
        # finished versions costs a reconcile what one with none does.
        book = self._book.update(versions)
        fleet = history.windowed(snapshot.fleet(pool, pods, agents, (), datetime.now(UTC)), book)
        live = {p.name for p in fleet.pods}
        self._failures = {k: f for k, f in self._failures.items() if k[0] in live}
        plan = planner.plan(fleet, tuple(self._failures.values()), self.rt.settings)

        # The pool first: if the operator dies between the two writes, a version that completed is
        # already current, and the next plan completes its WeightVersion again (idempotent). The
        # other order would leave a Complete version that is not current, and roll pods back.
        new_status = plan.pool_status.model_dump(mode="json", by_alias=True)
        if new_status != _dump_status(pool):
            await kube.patch_status(self.namespace, "inferencepools", self.name, new_status)
        for wv_name, status in plan.version_statuses.items():
            body = status.model_dump(mode="json", by_alias=True)
            await kube.patch_status(self.namespace, "weightversions", wv_name, body)
        await self._execute(plan, client, pool, self._book.objects)
        self.rt.metrics.observe(self.namespace, fleet, plan)
        return plan.requeue_after

    # ---- owned objects -------------------------------------------------------------------------

    async def _agent_client(self, uid: str) -> AgentClient:
        kube = self.rt.kube
        now = asyncio.get_running_loop().time()
        if self._client is not None and _fresh(self._token_checked, uid, now):
            return self._client
        name = token_secret_name(self.name)
        secret = await kube.get_secret(self.namespace, name)
        if secret is None:
            token = secrets.token_urlsafe(32)
            await kube.create_secret(
                self.namespace, build_token_secret(self.name, self.namespace, uid, token)
            )
        else:
            token = base64.b64decode(secret["data"][TOKEN_KEY]).decode()
        if self._client is None or token != self._token:
            if self._client is not None:
                await self._client.close()
            settings = self.rt.settings
            self._client = AgentClient(
                token, timeout_s=settings.agent_timeout, stage_timeout_s=settings.stage_timeout
            )
            self._token = token
        self._token_checked = (uid, now)
        return self._client

    async def _ensure_deployment(self, desired: Obj) -> None:
        kube = self.rt.kube
        digest = spec_hash(desired["spec"])
        desired["metadata"].setdefault("annotations", {})[SPEC_HASH] = digest
        now = asyncio.get_running_loop().time()
        if _fresh(self._deployment_checked, digest, now):
            return
        current = await kube.get_deployment(self.namespace, self.name)
        if current is None:
            await kube.create_deployment(self.namespace, desired)
            log.info("created deployment %s/%s", self.namespace, self.name)
        elif (current["metadata"].get("annotations") or {}).get(SPEC_HASH) != digest:
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await kube.replace_deployment(self.namespace, self.name, desired)
            log.info("updated deployment %s/%s", self.namespace, self.name)
        self._deployment_checked = (digest, now)

    async def _degraded(self, pool: Obj, reason: str, message: str) -> None:
        """Degraded=True with `reason`; a Warning Event with the same reason when the condition
        changes (not on every reconcile of a pool that stays so)."""
        status = InferencePool.model_validate(pool).status
        was = planner.condition(status.conditions, "Degraded")
        changed = was is None or (was.status, was.reason, was.message) != (
            ConditionStatus.TRUE,
            reason,
            message,
        )
        status.conditions = planner.set_condition(
            status.conditions,
            "Degraded",
            True,
            reason,
            message,
            datetime.now(UTC),
            pool["metadata"].get("generation"),
        )
        await self.rt.kube.patch_status(
            self.namespace, "inferencepools", self.name, status.model_dump(mode="json", by_alias=True)
        )
        if changed:
            await self.rt.kube.event(pool, reason, message, True, COMPONENT)

    async def _invalid_template(self, error: str) -> float:
        """End the pool's WeightVersions at their timeout while its template is invalid (no plan runs)."""
        objects = await self._reader().versions(self.namespace, self.name)
        statuses, requeue = planner.invalid_pool(
            snapshot.versions_of(self.name, objects), self.name, error, datetime.now(UTC), self.rt.settings
        )
        by_name = {o["metadata"]["name"]: o for o in objects}
        for wv_name, status in statuses.items():
            body = status.model_dump(mode="json", by_alias=True)
            await self.rt.kube.patch_status(self.namespace, "weightversions", wv_name, body)
            # A status is written only when its message changes (the pool turned invalid) or the
            # version times out: one Event each, like the planner's phase transitions.
            reason = "Failed" if status.phase.terminal else "InvalidTemplate"
            await self.rt.kube.event(by_name[wv_name], reason, status.message, True, COMPONENT)
        return requeue

    # ---- agents --------------------------------------------------------------------------------

    def _reader(self) -> FleetReader:
        return self.rt.reader if self.rt.reader is not None else ListReader(self.rt.kube)

    async def _agents(
        self, client: AgentClient, pods: list[Obj], port: int
    ) -> dict[str, protocol.AgentStatus | None]:
        """Each pod's agent status as its watch last saw it. A pod seen for the first time is asked
        once here (so the plan never acts on a pod it has not heard from), then watched; watches of
        pods gone, moved or no longer pollable stop."""
        wanted = {
            p["metadata"]["name"]: f"http://{p['status']['podIP']}:{port}"
            for p in pods
            if snapshot.pollable(p)
        }
        for name in list(self._watches):
            watch = self._watches[name]
            if wanted.get(name) != watch.endpoint or watch.client is not client:
                watch.cancel()
                del self._watches[name]

        async def first(name: str, endpoint: str) -> None:
            try:
                st: protocol.AgentStatus | None = await client.status(endpoint)
            except AgentClientError as e:
                log.debug("agent of %s: %s", name, e)
                st = None
            watch = AgentWatch(client, endpoint, self.wake.set, st, self.rt.agent_long_poll_s)
            self._watches[name] = watch
            watch.start(f"{self.namespace}/{name}")

        await asyncio.gather(*(first(n, ep) for n, ep in wanted.items() if n not in self._watches))
        out: dict[str, protocol.AgentStatus | None] = {}
        for p in pods:
            name = p["metadata"]["name"]
            seen = self._watches.get(name)
            out[name] = seen.status if seen is not None else None
        return out

    # ---- actions -------------------------------------------------------------------------------

    async def _execute(self, plan: Plan, client: AgentClient, pool: Obj, versions: Mapping[str, Obj]) -> None:
        quick = []
        for action in plan.actions:
            if isinstance(action, planner.Stage):
                self._start_stage(client, action)
            else:
                quick.append(self._run_action(client, action, pool, versions))
        for result in await asyncio.gather(*quick, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("pool %s/%s: action failed: %s", self.namespace, self.name, result)

    def _start_stage(self, client: AgentClient, action: planner.Stage) -> None:
        key = (action.pod, action.request.version)
        running = self._staging.get(key)
        if running is not None and not running.done():
            return

        async def stage() -> None:
            try:
                await client.stage(action.endpoint, action.request)
                self.rt.metrics.actions.labels("stage", "ok").inc()
                self._failures.pop(key, None)
            except AgentClientError as e:
                permanent = e.permanent or isinstance(e, AgentNotFound)
                self.rt.metrics.actions.labels("stage", "permanent" if permanent else "error").inc()
                self._record_failure(key, str(e), permanent, action.request.source)
            finally:
                self.wake.set()

        self._staging[key] = asyncio.create_task(stage(), name=f"stage {action.pod} {action.request.version}")

    def _record_failure(
        self, key: tuple[str, str], message: str, permanent: bool, source: protocol.Source | None
    ) -> None:
        prev = self._failures.get(key)
        attempts = prev.attempts + 1 if prev is not None and prev.source == source else 1
        self._failures[key] = ActionFailure(
            key[0], key[1], message, permanent, at=datetime.now(UTC), attempts=attempts, source=source
        )
        log.warning(
            "pool %s/%s: %s on pod %s failed (attempt %d): %s",
            self.namespace,
            self.name,
            "stage" if source is not None else "update",
            key[0],
            attempts,
            message,
        )

    async def _run_action(
        self, client: AgentClient, action: planner.Action, pool: Obj, versions: Mapping[str, Obj]
    ) -> None:
        kube = self.rt.kube
        kind = type(action).__name__
        try:
            if isinstance(action, planner.StartUpdate):
                # 409: already running (sent before a restart); the plan watches its progress.
                with contextlib.suppress(AgentConflict):
                    await client.start_update(action.endpoint, action.request)
                self._failures.pop((action.pod, action.request.version), None)
            elif isinstance(action, planner.DropStaged):
                with contextlib.suppress(AgentConflict, AgentNotFound):
                    await client.drop_staged(action.endpoint, action.version)
            elif isinstance(action, planner.SyncPod):
                if action.version_label is not None:
                    await kube.label_pod(self.namespace, action.pod, {VERSION_LABEL: action.version_label})
                if action.gate is not None:
                    await kube.set_pod_condition(
                        self.namespace,
                        action.pod,
                        READINESS_GATE,
                        action.gate,
                        action.gate_reason,
                        action.gate_message,
                    )
            elif isinstance(action, planner.PruneVersions):
                await self._prune(action, pool)
            elif isinstance(action, planner.Emit):
                involved = pool if action.kind == "InferencePool" else versions.get(action.name)
                if involved is not None:
                    await kube.event(involved, action.reason, action.message, action.warning, COMPONENT)
            self.rt.metrics.actions.labels(kind, "ok").inc()
        except AgentClientError as e:
            self.rt.metrics.actions.labels(kind, "error").inc()
            if isinstance(action, planner.StartUpdate):
                # Kept like a failed Stage: the plan backs off before sending it again and shows why.
                self._record_failure((action.pod, action.request.version), str(e), e.permanent, None)
            raise
        except Exception as e:
            self.rt.metrics.actions.labels(kind, f"http{api_status(e) or ''}").inc()
            raise

    async def _prune(self, action: planner.PruneVersions, pool: Obj) -> None:
        """Delete the versions beyond the history limit; one Event on the pool names those this call
        deleted (a restarted operator re-plans the rest: ones gone already are skipped, not counted)."""
        deleted = [
            v.version
            for v in action.versions
            if await self.rt.kube.delete_weight_version(self.namespace, v.name, v.uid)
        ]
        if not deleted:
            return
        log.info("pool %s/%s: pruned WeightVersions %s", self.namespace, self.name, ", ".join(deleted))
        message = (
            f"deleted {len(deleted)} finished WeightVersion(s) beyond spec.versionHistoryLimit="
            f"{action.limit}: {', '.join(deleted)}"
        )
        await self.rt.kube.event(pool, "VersionsPruned", message, False, COMPONENT)


def _fresh(checked: tuple[str, float] | None, key: str, now: float) -> bool:
    """Whether an owned object was read for `key` less than OWNED_RECHECK_S ago."""
    return checked is not None and checked[0] == key and now - checked[1] < OWNED_RECHECK_S


def _dump_status(pool: Obj) -> Obj:
    return InferencePool.model_validate(pool).status.model_dump(mode="json", by_alias=True)
