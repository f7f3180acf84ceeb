"""The agent's state machine: staged versions, the serving version, and one update at a time.

The HTTP layer (`api`) only parses and serialises; everything that decides lives here, and
everything that moves bytes lives in `staging`, `transport` and `handoff`. Blocking byte work runs
in threads so the API keeps answering status while an update runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hotswap_api import protocol
from hotswap_api.errors import ErrorCode

from hotswap_engine.agent import verify
from hotswap_engine.agent.changes import ENGINE_CHECK_S, MAX_WAIT_S, ChangeFeed
from hotswap_engine.agent.errors import (
    AgentError,
    BadRequest,
    CheckpointMismatchError,
    Conflict,
    ForbiddenPathError,
    NotFound,
)
from hotswap_engine.agent.settings import AgentSettings
from hotswap_engine.metrics import AgentMetrics

if TYPE_CHECKING:
    from hotswap_engine.agent.runner import UpdateRunner
    from hotswap_engine.staging import StagedCheckpoint

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class StagedEntry:
    meta: protocol.StagedVersion
    data: StagedCheckpoint


@dataclass
class UpdateRecord:
    """Mutable twin of `protocol.UpdateProgress`, updated from the transfer thread."""

    id: str
    version: str
    mode: protocol.UpdateMode
    stage: protocol.UpdateStage = protocol.UpdateStage.PENDING
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None
    durations: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_code: ErrorCode | None = None  # set with `error` when the cause is classified (`as_api_error`)
    peer_bytes: dict[str, int] = field(default_factory=dict)  # p2p: bytes served by each peer
    peers_failed: list[str] = field(default_factory=list)  # p2p: peers given up on
    engine_workers: list[dict[str, Any]] = field(default_factory=list)  # the launcher's apply results
    # Called after `stage` changes (the runner moves it along): the agent's change feed, so a
    # long-polling operator hears of every stage, not of byte progress.
    on_change: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "stage":
            hook = self.__dict__.get("on_change")
            if hook is not None:
                hook()

    def to_model(self) -> protocol.UpdateProgress:
        return protocol.UpdateProgress(
            id=self.id,
            version=self.version,
            mode=self.mode,
            stage=self.stage,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            started_at=self.started_at,
            finished_at=self.finished_at,
            durations=dict(self.durations),
            error=self.error,
            error_code=self.error_code,
            peer_bytes=dict(self.peer_bytes),
            peers_failed=tuple(self.peers_failed),
        )


class AgentService:
    def __init__(self, cfg: AgentSettings, runner: UpdateRunner, metrics: AgentMetrics | None = None) -> None:
        self.cfg = cfg
        self.runner = runner
        self.metrics = metrics or AgentMetrics()
        self._staged: dict[str, StagedEntry] = {}
        self._staging: dict[str, asyncio.Future[StagedEntry]] = {}
        self._serving: str | None = None  # None: the base checkpoint the engine started with
        self._updates: dict[str, UpdateRecord] = {}
        self._latest: UpdateRecord | None = None
        self._task: asyncio.Task[None] | None = None
        # False while the engine may hold weights that no version fully describes (a failed apply
        # that has not been rolled back yet); the pod's readiness probe follows it.
        self._consistent = True
        # The verification of the served version's weights (`agent.verify`); a failed one keeps the
        # pod not ready until another version is applied and passes.
        self._check: protocol.WeightsCheck | None = None
        self._last_error: str | None = None
        # Whether the launcher answered its last health check. An agent whose engine is not up (a
        # pod still starting vLLM) cannot apply anything: the operator must not send it an update,
        # which could only time out waiting for the engine's workers.
        self._engine_up = False
        self.max_wait_s = min(cfg.max_status_wait, MAX_WAIT_S)  # the longest a long-poll is held
        self.changes = ChangeFeed()  # bumped on every change `status()` reports (see `changes`)
        # Set on SIGTERM: long-polls answer at once instead of holding the HTTP server's shutdown
        # (and with it this pod's peer-to-peer memory) for up to `max_wait_s`.
        self._stopping = False

    # ---- status -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> protocol.AgentStatus:
        return protocol.AgentStatus(
            pod=self.cfg.pod_name,
            sequence=self.changes.sequence,
            serving_version=self._serving,
            ready=self._consistent and self._verified and not self.busy,
            engine_up=self._engine_up,
            staged=tuple(e.meta for e in self._staged.values()),
            update=self._latest.to_model() if self._latest else None,
            last_error=self._last_error,
            p2p_endpoint=self.runner.p2p_endpoint,
            weights_check=self._check,
        )

    @property
    def _verified(self) -> bool:
        return self._check is None or self._check.received_ok

    async def check_engine(self) -> None:
        """Refresh `_engine_up` from the launcher's /healthz (the status handler calls it). Skipped
        while an update runs: that talks to the launcher itself."""
        if self.busy:
            return
        from hotswap_engine import launcher_client

        try:
            health = await launcher_client.healthz(str(self.cfg.control_socket), timeout=2.0)
            up = bool(health.get("engine_alive", True))
        except launcher_client.LauncherUnreachable:
            health, up = {}, False
        if self.busy:
            # An update (or another check's re-apply) started while this one waited for the
            # launcher: what it read may already be stale, and acting on it could start a second apply.
            return
        changed = up != self._engine_up
        self._engine_up = up
        if up and self._serving is not None and health.get("version") != self._serving:
            self._engine_restarted(health)
            changed = True
        elif up and self._serving is None and health.get("restarted_from") and self._consistent:
            self._paused_without_version(str(health["restarted_from"]))
            changed = True
        if changed:
            self.changes.bump()

    def _engine_restarted(self, health: dict[str, Any]) -> None:
        """The launcher restarted (its container was killed and came back): the engine holds the
        base checkpoint, not `_serving`. A launcher that knows it lost a version (`restarted_from`)
        keeps generation paused, so nothing is answered from those weights meanwhile. When that is
        the version served here and its host copy is complete, it is applied again at once (the pod
        is back in about one local apply); otherwise the agent reports the base checkpoint and not
        ready, and the operator brings the pod to the pool's version like any pod behind."""
        lost = health.get("restarted_from")
        served = self._serving
        assert served is not None
        entry = self._staged.get(served)
        if lost == served and entry is not None and entry.meta.complete:
            log.warning("the engine restarted and lost %s: applying it again from host memory", served)
            rec = UpdateRecord(
                id=f"reapply-{uuid.uuid4().hex[:8]}",
                version=served,
                mode=protocol.UpdateMode.BROADCAST,
                on_change=self.changes.bump,
            )
            self._updates[rec.id] = rec  # not `_latest`: that stays the operator's last update
            self._task = asyncio.create_task(self._reapply(served, entry, rec))
            return
        log.warning(
            "the engine restarted: it serves the base checkpoint, not %s (launcher reports %r, lost %r)",
            served,
            health.get("version"),
            lost,
        )
        self._last_error = f"the engine restarted on the base checkpoint; it served {served}"
        self._serving = None
        self._check = None
        if lost is not None:
            self._paused_without_version(str(lost))
        self.metrics.set_serving(None)

    def _paused_without_version(self, lost: str) -> None:
        """The engine restarted and paused itself: it served `lost`, which this agent cannot apply
        again (it restarted too, or holds no full copy). Not ready until the operator applies a
        version, which resumes generation."""
        self._consistent = False
        self._last_error = f"the engine restarted (it served {lost}) and waits, paused, for a version"

    async def _reapply(self, version: str, entry: StagedEntry, rec: UpdateRecord) -> None:
        t0 = time.perf_counter()
        try:
            await self.runner.apply_local(version, entry.data)
            # Whole and as served before (a rollback that failed while the engine was down included).
            self._consistent, self._last_error = True, None
            rec.stage = protocol.UpdateStage.COMPLETE
            log.info("applied %s again after the engine restarted", version)
        except Exception as e:
            msg = f"the engine restarted and re-applying {version} failed: {e}"
            log.error("%s", msg)
            self._last_error = rec.error = msg
            self._serving, self._check, self._consistent = None, None, False
            self.metrics.set_serving(None)
            rec.stage = protocol.UpdateStage.FAILED
        finally:
            rec.durations["reapply"] = round(time.perf_counter() - t0, 4)
            rec.finished_at = _now()
            self.changes.bump()

    async def wait_status(self, after: int, timeout_s: float) -> protocol.AgentStatus:
        """The status once it changed past sequence `after`, or at `timeout_s` (capped at
        `changes.MAX_WAIT_S`). Unless an update runs, the engine's health is checked every
        `ENGINE_CHECK_S` meanwhile, so that its coming up, going down or restarting (a pod's readiness
        rests on it) is a change like any other, seen within about a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(0.0, timeout_s), self.max_wait_s)
        await self.check_engine()
        while not self._stopping and not self.changes.changed_since(after):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            step = remaining if self.busy else min(remaining, ENGINE_CHECK_S)
            if not await self.changes.wait(after, step):
                await self.check_engine()
        return self.status()

    # ---- staging ------------------------------------------------------------------------------

    async def stage(self, req: protocol.StageRequest) -> protocol.StagedVersion:
        have = self._staged.get(req.version)
        if have is not None and have.meta.source == req.source and _covers(have.meta, req.part):
            return have.meta  # idempotent: the operator may repeat a request after a restart
        if have is not None and have.meta.source != req.source and req.version == self._serving:
            raise Conflict(
                f"version {req.version} is served here from {have.meta.source.describe()}; another "
                f"checkpoint ({req.source.describe()}) needs a new version"
            )
        pending = self._staging.get(req.version)
        if pending is not None:
            return (await asyncio.shield(pending)).meta
        if self.busy and self._latest is not None and self._latest.version == req.version:
            raise Conflict(f"version {req.version} is being applied; it cannot be re-staged now")
        fut: asyncio.Future[StagedEntry] = asyncio.get_running_loop().create_future()
        self._staging[req.version] = fut
        try:
            t0 = time.perf_counter()
            data = await asyncio.to_thread(self.runner.stage, req.source, req.part)
            seconds = time.perf_counter() - t0
            meta = protocol.StagedVersion(
                version=req.version,
                source=req.source,
                part=req.part,
                complete=req.part is None or req.part.count == 1,
                bytes=data.nbytes,
                tensors=len(data.tensors),
                stage_seconds=round(seconds, 4),
            )
            entry = StagedEntry(meta, data)
            old = self._staged.pop(req.version, None)
            if old is not None:  # staged before from another source: the new bytes replace it
                if old.meta.p2p is not None:
                    self.runner.withdraw(req.version)
                old.data.release()
            self._staged[req.version] = entry
            self.metrics.stage_seconds.labels("staging").observe(seconds)
            self.metrics.bytes_moved.labels("staging").inc(data.nbytes)
            self._update_staged_gauge()
            self.changes.bump()
            fut.set_result(entry)
            return meta
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise as_api_error(e) from e
        finally:
            self._staging.pop(req.version, None)

    def drop(self, version: str) -> None:
        if version not in self._staged:
            raise NotFound(f"version {version} is not staged here")
        if version == self._serving:
            raise Conflict(f"version {version} is being served: it stays staged as the rollback source")
        if self.busy and self._latest is not None and self._latest.version == version:
            raise Conflict(f"version {version} is being applied")
        self.runner.withdraw(version)
        self._staged.pop(version).data.release()
        self._update_staged_gauge()
        self.changes.bump()

    def _update_staged_gauge(self) -> None:
        self.metrics.staged_bytes.set(sum(e.meta.bytes for e in self._staged.values()))

    # ---- updates ------------------------------------------------------------------------------

    def get_update(self, update_id: str) -> protocol.UpdateProgress:
        rec = self._updates.get(update_id)
        if rec is None:
            raise NotFound(f"no update with id {update_id}")
        return rec.to_model()

    async def start_update(self, req: protocol.UpdateRequest) -> protocol.UpdateProgress:
        if self.busy:
            assert self._latest is not None
            raise Conflict(
                f"update {self._latest.id} to version {self._latest.version} is still running "
                f"(stage {self._latest.stage})"
            )
        entry = self._staged.get(req.version)
        if req.mode is protocol.UpdateMode.BROADCAST:
            assert req.group is not None and req.rank is not None
            me = next(m for m in req.group.members if m.rank == req.rank)
            if me.pod != self.cfg.pod_name:
                raise BadRequest(f"rank {req.rank} belongs to pod {me.pod}, this is pod {self.cfg.pod_name}")
            if entry is None:
                raise NotFound(f"version {req.version} is not staged here; stage it before the update")
            if not _covers(entry.meta, me.part):
                raise BadRequest(
                    f"version {req.version} is staged here as part {entry.meta.part}, "
                    f"but the group assigns this pod part {me.part}"
                )
        rec = UpdateRecord(
            id=uuid.uuid4().hex[:12], version=req.version, mode=req.mode, on_change=self.changes.bump
        )
        self._updates[rec.id] = rec
        self._latest = rec
        self._task = asyncio.create_task(self._run(req, rec, entry))
        self.changes.bump()
        return rec.to_model()

    async def _run(self, req: protocol.UpdateRequest, rec: UpdateRecord, entry: StagedEntry | None) -> None:
        previous = self._serving
        t0 = time.perf_counter()
        try:
            full = await self.runner.update(req, entry.data if entry else None, rec)
        except Exception as e:
            msg = f"update to {req.version} failed: {e}"
            log.warning("%s", msg)
            self._consistent = False
            self._last_error = msg
            rec.error = msg
            classified = as_api_error(e)
            if isinstance(classified, AgentError):
                rec.error_code = classified.code
            self.metrics.updates.labels("failed").inc()
            # A rank worker whose NCCL group had to be abandoned has exited on its own and is
            # replaced before the rollback below runs through the workers: the agent stays up.
            if getattr(e, "engine_touched", True):
                await self._roll_back(previous, rec)
            else:
                self._consistent = True
            rec.stage = protocol.UpdateStage.FAILED
            rec.finished_at = _now()
            return
        t_check = time.perf_counter()
        check: protocol.WeightsCheck | None
        try:
            check = await verify.check_weights(
                str(self.cfg.control_socket),
                req.version,
                entry.meta.source if entry else None,
                full,
                rec.engine_workers,
            )
        except Exception as e:  # a check that could not run verified nothing: reported, not fatal
            log.error("could not verify the weights of %s: %s", req.version, e)
            check = None
        rec.durations["verify"] = round(time.perf_counter() - t_check, 4)
        meta = protocol.StagedVersion(
            version=req.version,
            source=entry.meta.source if entry else protocol.Source(path=f"p2p:{req.peers[0].pod}"),
            part=None,
            complete=True,
            bytes=full.nbytes,
            tensors=len(full.tensors),
            stage_seconds=entry.meta.stage_seconds if entry else None,
        )
        old = self._staged.get(req.version)
        if old is not None and old.data is not full:
            self.runner.withdraw(req.version)
            _release_unshared(old.data, full)
        try:
            p2p = await asyncio.to_thread(self.runner.publish, req.version, full)
        except Exception as e:  # serving works without it; scale-out then stages from storage
            log.warning("could not offer %s to peers: %s", req.version, e)
            p2p = None
        meta = meta.model_copy(update={"p2p": p2p})
        self._staged[req.version] = StagedEntry(meta, full)
        self._update_staged_gauge()
        self._serving = req.version
        self._consistent = True
        self._check = check
        failed = check is not None and not check.received_ok
        self._last_error = verify.describe(check) if check is not None and failed else None
        if failed:
            # Applied, but not what the version holds: serve no traffic (readiness fails) and let
            # the operator say which pod and tensor; the next version applied here is checked again.
            log.error("%s", self._last_error)
            self.metrics.updates.labels("unverified").inc()
        self.metrics.set_serving(req.version)
        self.metrics.updates.labels("complete").inc()
        for stage, seconds in rec.durations.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.bytes_moved.labels("transfer").inc(rec.bytes_total)
        rec.durations["total"] = round(time.perf_counter() - t0, 4)
        rec.stage = protocol.UpdateStage.COMPLETE
        rec.finished_at = _now()

    async def _roll_back(self, previous: str | None, rec: UpdateRecord) -> None:
        """Re-apply the version served before the failed update from local host memory (or from
        storage when it is not staged in full here), so the engine never keeps mixed weights."""
        rec.stage = protocol.UpdateStage.ROLLING_BACK
        t0 = time.perf_counter()
        entry = self._staged.get(previous) if previous is not None else None
        try:
            if entry is not None and entry.meta.complete:
                data = entry.data
            else:
                source = entry.meta.source if entry else protocol.Source(path=str(self.cfg.base_checkpoint))
                data = await asyncio.to_thread(self.runner.stage, source, None, True)
            await self.runner.apply_local(previous, data)
            self._consistent = True
            self._check = None  # a re-apply of what was served: not verified again
            log.info("rolled back to %s", previous or "the base checkpoint")
        except Exception as e:
            # The engine stays paused by the launcher: it serves nothing rather than mixed weights.
            self._last_error = f"{rec.error}; rollback to {previous or 'base'} failed too: {e}"
            rec.error = self._last_error
            log.error("%s", self._last_error)
        finally:
            rec.durations["rollback"] = round(time.perf_counter() - t0, 4)

    async def recover(self) -> None:
        """On start: if the engine was left paused by an update that never finished (an agent that
        died mid-update), give it the base checkpoint back so it serves complete weights again.
        The operator then brings the pod to the pool's current version like any pod behind."""
        from hotswap_engine import launcher_client

        try:
            health = await launcher_client.healthz(str(self.cfg.control_socket))
        except launcher_client.LauncherUnreachable:
            return  # the engine is not up yet: a fresh engine is not paused
        if not health.get("paused"):
            return
        if health.get("restarted_from"):
            # The launcher restarted too and paused itself (it had served a version this agent no
            # longer holds): restoring the base here would resume it on weights the pool may not
            # serve. Stay not ready; the operator applies the pool's version, which resumes it.
            self._paused_without_version(str(health["restarted_from"]))
            self.changes.bump()
            return
        log.warning("engine is paused after an unfinished update (%s): restoring the base", health)
        rec = UpdateRecord(
            id="recover", version="base", mode=protocol.UpdateMode.BROADCAST, on_change=self.changes.bump
        )
        self._consistent = False
        self._latest = rec
        self._task = asyncio.create_task(self._restore_base(rec))
        self.changes.bump()

    async def _restore_base(self, rec: UpdateRecord) -> None:
        await self._roll_back(None, rec)
        rec.stage = protocol.UpdateStage.COMPLETE if self._consistent else protocol.UpdateStage.FAILED
        rec.finished_at = _now()

    def begin_shutdown(self) -> None:
        """The pod is terminating: answer every open and later long-poll now. A terminating pod
        stops serving its memory to peers promptly; their readers fail over to other holders."""
        self._stopping = True
        self.changes.bump()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for e in self._staged.values():
            e.data.release()
        self._staged.clear()
        self.runner.close()


def _release_unshared(old: StagedCheckpoint, new: StagedCheckpoint) -> None:
    """Free `old`'s host buffers except those `new` reuses: a broadcast builds the full version
    around this pod's staged part, so that buffer now belongs to the full version."""
    kept = {id(b) for b in new.segments.values()}
    for buffer in old.segments.values():
        if id(buffer) not in kept:
            buffer.close()
    old.segments = {}
    old.tensors = {}


def _covers(meta: protocol.StagedVersion, part: protocol.PartSpec | None) -> bool:
    """Whether a staged copy holds at least `part` (a complete copy holds every part)."""
    return meta.complete or meta.part == part


def as_api_error(e: Exception) -> Exception:
    from hotswap_engine import staging

    if isinstance(e, staging.CheckpointChanged):  # transient: the operator retries with backoff
        return Conflict(str(e))
    if isinstance(e, staging.InvalidPath):
        return BadRequest(str(e))
    if isinstance(e, staging.ForbiddenPath):
        return ForbiddenPathError(str(e))
    if isinstance(e, staging.CheckpointNotFound):
        return NotFound(str(e))
    if isinstance(e, staging.StagingError):
        return CheckpointMismatchError(str(e))
    if isinstance(e, FileNotFoundError):
        return NotFound(f"checkpoint not found: {e}")
    return e
