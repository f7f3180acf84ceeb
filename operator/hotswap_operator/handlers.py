"""kopf registrations: thin. Decisions live in `planner`, I/O in `controller`.

- Every InferencePool event makes sure the pool's `PoolController` loop runs (kopf lists every
  existing pool when it starts: that is the resume) and wakes it; a DELETED event stops it.
- WeightVersion and pod events only wake the pool's loop, so it reacts at once instead of at its
  next requeue.
- A WeightVersion whose pool does not exist (never created, or deleted — a pool's DELETED event
  looks at its versions at once) gets `planner.orphan_status`: a started rollout fails with reason
  PoolNotFound; one that never started is Accepted=False until its pool appears, and a check at its
  deadline fails it then, so none stays unfinished past its timeout.
- A liveness probe reports how many pools are being reconciled.
- Two kopf indices, fed by the same watches, are the loops' read path (`watched.IndexReader`): pods
  by (namespace, pool label), WeightVersions by (namespace, poolRef). kopf runs no handler before
  both hold their initial listing, so a loop never starts on a half-filled cache.

Why event handlers and not `kopf.daemon`: kopf puts a finalizer on every object that has a daemon,
so a pool could not be deleted (nor its namespace) while the operator is down. Nothing here needs
one — the Deployment and Secret go with the pool through their ownerReferences — and kopf keeps no
state on our objects: everything a rollout needs is in the statuses the planner writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from hotswap_api.labels import GROUP, POOL_LABEL
from hotswap_api.resources import VERSION

from hotswap_operator import snapshot
from hotswap_operator.controller import COMPONENT, PoolController, Runtime
from hotswap_operator.planner import deadline, orphan_status
from hotswap_operator.watched import IndexReader, pool_of_version

log = logging.getLogger(__name__)


class Registry:
    """The running pool loops, by (namespace, name)."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.pools: dict[tuple[str, str], tuple[PoolController, asyncio.Task[None]]] = {}
        self.rechecks: dict[tuple[str, str], asyncio.Task[None]] = {}  # orphaned versions, by deadline

    def ensure(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        running = self.pools.get(key)
        if running is not None and not running[1].done():
            running[0].wake.set()
            return
        if self.runtime is None:
            raise kopf.PermanentError("the operator runtime is not configured")
        ctl = PoolController(self.runtime, namespace, name)
        task = asyncio.create_task(ctl.run(), name=f"pool {namespace}/{name}")
        self.pools[key] = (ctl, task)

    def wake(self, namespace: str, name: str | None) -> bool:
        running = self.pools.get((namespace, name or ""))
        if running is None:
            return False
        running[0].wake.set()
        return True

    async def stop(self, namespace: str, name: str) -> None:
        running = self.pools.pop((namespace, name), None)
        if running is None:
            return
        running[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running[1]
        if self.runtime is not None:
            self.runtime.metrics.forget_pool(namespace, name)

    async def stop_all(self) -> None:
        for namespace, name in list(self.pools):
            await self.stop(namespace, name)
        for task in self.rechecks.values():
            task.cancel()
        self.rechecks.clear()

    def recheck_at(self, namespace: str, name: str, when: datetime) -> None:
        """Look at an orphaned WeightVersion again at `when` (its deadline)."""
        key = (namespace, name)
        old = self.rechecks.pop(key, None)
        if old is not None and old is not asyncio.current_task():
            old.cancel()

        async def later() -> None:
            await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()) + 1.0)
            self.rechecks.pop(key, None)
            try:
                await orphan_check(namespace, name)
            except Exception:
                log.exception("checking weightversion %s/%s", namespace, name)

        self.rechecks[key] = asyncio.create_task(later(), name=f"recheck {namespace}/{name}")


REGISTRY = Registry()


def configure(runtime: Runtime) -> None:
    REGISTRY.runtime = runtime


@kopf.on.startup()
def _settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping (none is expected with event handlers only) goes to annotations under our
    # prefix, never to status, whose schema would prune it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # our Events are written by the controller
    settings.watching.server_timeout = 300


@kopf.on.login()
def _login(**_: Any) -> kopf.ConnectionInfo:
    """kopf talks to the apiserver with the same credentials as our client: the kubeconfig given on
    the command line, or the in-cluster ServiceAccount (kopf's own lookup reads only KUBECONFIG as it
    was when the kubernetes package was imported)."""
    if REGISTRY.runtime is None:
        raise kopf.LoginError("the operator runtime is not configured")
    cfg = REGISTRY.runtime.kube.api.configuration
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _sep, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup()
async def _stop_loops(**_: Any) -> None:
    await REGISTRY.stop_all()


async def orphan(obj: Mapping[str, Any]) -> None:
    """Write `orphan_status` for a WeightVersion whose pool does not exist (see the module docstring)."""
    runtime = REGISTRY.runtime
    if runtime is None:
        return
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    view = snapshot.version_view(obj)
    status = orphan_status(view, namespace, datetime.now(UTC))
    if status is not None:
        await runtime.kube.patch_status(
            namespace, "weightversions", name, status.model_dump(mode="json", by_alias=True)
        )
        # Written only when something changed (orphan_status answers None otherwise): one Event
        # when the version starts waiting for its pool, one when it fails.
        reason = "Failed" if status.phase.terminal else "PoolNotFound"
        await runtime.kube.event(dict(obj), reason, status.message, True, COMPONENT)
    if status is None or not status.phase.terminal:
        REGISTRY.recheck_at(namespace, name, deadline(view))


async def orphan_check(namespace: str, name: str) -> None:
    """Re-read a WeightVersion and its pool; act if the pool is (still) missing."""
    runtime = REGISTRY.runtime
    if runtime is None:
        return
    obj = await runtime.kube.get_weight_version(namespace, name)
    if obj is None:
        return
    pool = obj["spec"]["poolRef"]["name"]
    if REGISTRY.wake(namespace, pool) or await runtime.kube.get_pool(namespace, pool) is not None:
        return  # the pool's loop owns it (and enforces its timeout)
    await orphan(obj)


@kopf.index("", "v1", "pods", labels={POOL_LABEL: kopf.PRESENT})
def pods_by_pool(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels[POOL_LABEL]): dict(body)}


@kopf.index(GROUP, VERSION, "weightversions")
def versions_by_pool(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    pool = pool_of_version(body)
    return {(namespace, pool): dict(body)} if pool else None


def use_indices(pods: kopf.Index[Any, Any], versions: kopf.Index[Any, Any]) -> None:
    """Give the loops the watch-fed read path (once: kopf passes the same index objects each time)."""
    runtime = REGISTRY.runtime
    if runtime is not None and runtime.reader is None:
        runtime.reader = IndexReader(pods, versions)


@kopf.on.event(GROUP, VERSION, "inferencepools")
async def pool_event(type: str, namespace: str | None, name: str, **kwargs: Any) -> None:
    if namespace is None:
        return
    # kopf passes every index to every handler, by the indexing function's name
    versions_by_pool: kopf.Index[Any, Any] = kwargs["versions_by_pool"]
    use_indices(kwargs["pods_by_pool"], versions_by_pool)
    if type != "DELETED":
        REGISTRY.ensure(namespace, name)
        return
    await REGISTRY.stop(namespace, name)
    runtime = REGISTRY.runtime
    if runtime is None or await runtime.kube.get_pool(namespace, name) is not None:
        return  # created again meanwhile: its new loop takes the versions over
    for obj in list(versions_by_pool.get((namespace, name), ())):
        await orphan(obj)


@kopf.on.event(GROUP, VERSION, "weightversions")
async def weight_version_event(
    type: str, namespace: str | None, name: str, spec: kopf.Spec, body: kopf.Body, **_: Any
) -> None:
    pool = (spec.get("poolRef") or {}).get("name")
    if namespace is None or pool is None or REGISTRY.wake(namespace, pool):
        return
    runtime = REGISTRY.runtime
    if type == "DELETED" or runtime is None:
        task = REGISTRY.rechecks.pop((namespace, name), None)
        if task is not None:
            task.cancel()
        return
    if await runtime.kube.get_pool(namespace, pool) is not None:
        return  # the pool's loop is starting; it will pick this version up
    await orphan(dict(body))


@kopf.on.event("", "v1", "pods", labels={POOL_LABEL: kopf.PRESENT})
async def pod_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    if namespace is not None:
        REGISTRY.wake(namespace, labels.get(POOL_LABEL))


@kopf.on.probe(id="pools")
def pools_probe(**_: Any) -> int:
    return len(REGISTRY.pools)
