"""A STAND-IN for the in-pod agent, for scale runs and operator tests: `python -m hotswap_testing.sim_agent`.

It is not the agent and never ships (testing/ is not in any image). It serves the agent's HTTP API with
the same wire models (`hotswap_api.protocol`), the same bearer auth, error bodies (`ErrorBody`,
`ErrorCode`) and status long-poll (`ChangeFeed`, the agent's own), but moves no bytes: staging, the
connect/transfer/reload stages of an update and a p2p read each take a configured time instead. That
lets the real operator, apiserver, controller-manager and kubelet stand-in carry a fleet of hundreds of
pods on a machine that could not run hundreds of vLLM engines.

It runs as the engine container of a pool's pods: the operator's `engine_command` setting names it
(its own flags first, then the agent's flags the operator always passes; the ones that only matter to
the real agent are accepted and ignored). The pods' inference container is trivial then (the
operator's `inference_command`, e.g. `sleep`): nothing talks to it.

Failures on command: `POST /sim/v1/faults` (bearer auth, test-only) queues `SimFault`s: the next
Stage or StartUpdate request is refused with a given `ErrorCode`, or the next update runs and ends
Failed (after rolling back, like the agent). `GET /sim/v1/counters` answers how many requests of each
route this stand-in served (what the operator cost it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Middleware
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from hotswap_engine.agent.changes import ChangeFeed
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("hotswap_testing.sim_agent")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The HTTP status each code answers with on the agent's routes (docs/agent-openapi.json).
HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN_PATH: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.CHECKPOINT_MISMATCH: 422,
    ErrorCode.INTERNAL: 500,
}
FAULTS_PATH = "/sim/v1/faults"
COUNTERS_PATH = "/sim/v1/counters"


class SimFault(BaseModel):
    """One failure on command. `Stage`/`StartUpdate`: the next such request (of `version`, if given) is
    refused with `code`. `Update`: the next update (of `version`) runs until `at` and ends Failed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["Stage", "StartUpdate", "Update"]
    code: ErrorCode = ErrorCode.INTERNAL
    at: protocol.UpdateStage = protocol.UpdateStage.TRANSFERRING
    version: str | None = None
    times: int = Field(default=1, ge=1)


class SimFaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    faults: tuple[SimFault, ...]


@dataclass(frozen=True)
class SimTimes:
    """Seconds each simulated step takes (what a scale run subtracts from a rollout's wall time)."""

    stage: float = 0.5
    connect: float = 0.1
    transfer: float = 1.0
    reload: float = 0.2
    p2p: float = 0.5
    engine_start: float = 0.0  # until `engine_up` (vLLM loading)

    @property
    def broadcast_update(self) -> float:
        return self.connect + self.transfer + self.reload


class Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Faults:
    queued: list[SimFault] = field(default_factory=list)

    def take(self, action: str, version: str) -> SimFault | None:
        for i, f in enumerate(self.queued):
            if f.action == action and f.version in (None, version):
                if f.times > 1:
                    self.queued[i] = f.model_copy(update={"times": f.times - 1})
                else:
                    del self.queued[i]
                return f
        return None


def _now() -> datetime:
    return datetime.now(UTC)


class SimAgent:
    """The agent's state machine, in simulated time: staged versions, the served one, one update."""

    def __init__(self, pod: str, host: str, port: int, times: SimTimes, model_bytes: int) -> None:
        self.pod, self.host, self.port = pod, host, port
        self.times = times
        self.model_bytes = model_bytes
        self.changes = ChangeFeed()
        self.faults = _Faults()
        self.staged: dict[str, protocol.StagedVersion] = {}
        self.serving: str | None = None
        self.latest: protocol.UpdateProgress | None = None
        self.updates: dict[str, protocol.UpdateProgress] = {}
        self.task: asyncio.Task[None] | None = None
        self.engine_up = times.engine_start <= 0
        self.last_error: str | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def status(self) -> protocol.AgentStatus:
        return protocol.AgentStatus(
            pod=self.pod,
            sequence=self.changes.sequence,
            serving_version=self.serving,
            ready=not self.busy,
            engine_up=self.engine_up,
            staged=tuple(self.staged.values()),
            update=self.latest,
            last_error=self.last_error,
            p2p_endpoint=f"{self.host}:{self.port + 1}",
        )

    async def start_engine(self) -> None:
        await asyncio.sleep(self.times.engine_start)
        self.engine_up = True
        self.changes.bump()

    async def stage(self, req: protocol.StageRequest) -> protocol.StagedVersion:
        have = self.staged.get(req.version)
        if have is not None and have.source == req.source and (have.complete or have.part == req.part):
            return have  # idempotent, like the agent
        fault = self.faults.take("Stage", req.version)
        if fault is not None:
            raise Refused(fault.code, f"simulated: staging {req.version} refused ({fault.code})")
        await asyncio.sleep(self.times.stage)
        count = req.part.count if req.part is not None else 1
        meta = protocol.StagedVersion(
            version=req.version,
            source=req.source,
            part=req.part,
            complete=count == 1,
            bytes=self.model_bytes // count,
            tensors=max(1, 300 // count),
            stage_seconds=self.times.stage,
        )
        self.staged[req.version] = meta
        self.changes.bump()
        return meta

    def drop(self, version: str) -> None:
        if version not in self.staged:
            raise Refused(ErrorCode.NOT_FOUND, f"version {version} is not staged here")
        if version == self.serving:
            raise Refused(ErrorCode.CONFLICT, f"version {version} is being served")
        if self.busy and self.latest is not None and self.latest.version == version:
            raise Refused(ErrorCode.CONFLICT, f"version {version} is being applied")
        del self.staged[version]
        self.changes.bump()

    def start_update(self, req: protocol.UpdateRequest) -> protocol.UpdateProgress:
        if self.busy:
            assert self.latest is not None
            raise Refused(ErrorCode.CONFLICT, f"update {self.latest.id} is still running")
        fault = self.faults.take("StartUpdate", req.version)
        if fault is not None:
            raise Refused(fault.code, f"simulated: update to {req.version} refused ({fault.code})")
        if req.mode is protocol.UpdateMode.BROADCAST:
            assert req.group is not None and req.rank is not None
            me = next(m for m in req.group.members if m.rank == req.rank)
            if me.pod != self.pod:
                raise Refused(ErrorCode.BAD_REQUEST, f"rank {req.rank} belongs to pod {me.pod}")
            have = self.staged.get(req.version)
            if have is None:
                raise Refused(ErrorCode.NOT_FOUND, f"version {req.version} is not staged here")
            if not (have.complete or have.part == me.part):
                raise Refused(ErrorCode.BAD_REQUEST, f"staged part {have.part} is not {me.part}")
        progress = protocol.UpdateProgress(
            id=uuid.uuid4().hex[:12],
            version=req.version,
            mode=req.mode,
            stage=protocol.UpdateStage.PENDING,
            bytes_total=self.model_bytes,
            started_at=_now(),
        )
        self._set(progress)
        self.task = asyncio.create_task(self._run(req, progress, self.faults.take("Update", req.version)))
        return progress

    def _set(self, progress: protocol.UpdateProgress) -> None:
        self.latest = progress
        self.updates[progress.id] = progress
        self.changes.bump()

    async def _run(
        self, req: protocol.UpdateRequest, p: protocol.UpdateProgress, fault: SimFault | None
    ) -> None:
        t = self.times
        if req.mode is protocol.UpdateMode.BROADCAST:
            steps = [
                (protocol.UpdateStage.CONNECTING, "connect", t.connect),
                (protocol.UpdateStage.TRANSFERRING, "transfer", t.transfer),
                (protocol.UpdateStage.RELOADING, "reload", t.reload),
            ]
        else:
            steps = [
                (protocol.UpdateStage.TRANSFERRING, "p2p", t.p2p),
                (protocol.UpdateStage.RELOADING, "reload", t.reload),
            ]
        durations: dict[str, float] = {}
        for stage, key, seconds in steps:
            p = p.model_copy(update={"stage": stage})
            self._set(p)
            if fault is not None and fault.at == stage:
                await self._fail(p, durations, f"simulated failure while {stage}")
                return
            await asyncio.sleep(seconds)
            durations[key] = seconds
        self.serving = req.version
        self.last_error = None
        self.staged[req.version] = protocol.StagedVersion(
            version=req.version,
            source=self.staged[req.version].source
            if req.version in self.staged
            else protocol.Source(path=f"p2p:{req.peers[0].pod}"),
            part=None,
            complete=True,
            bytes=self.model_bytes,
            tensors=300,
            stage_seconds=t.stage,
            p2p=self._p2p_source(req.version),
        )
        durations["total"] = round(sum(durations.values()), 4)
        self._set(
            p.model_copy(
                update={
                    "stage": protocol.UpdateStage.COMPLETE,
                    "bytes_done": self.model_bytes,
                    "durations": durations,
                    "finished_at": _now(),
                }
            )
        )

    async def _fail(self, p: protocol.UpdateProgress, durations: dict[str, float], error: str) -> None:
        """Like the agent: roll back to what was served (the engine never keeps mixed weights), then
        report Failed with the error; the pod serves its previous version and is ready again."""
        self.last_error = error
        self._set(p.model_copy(update={"stage": protocol.UpdateStage.ROLLING_BACK, "error": error}))
        await asyncio.sleep(self.times.reload)
        durations["rollback"] = self.times.reload
        self._set(
            p.model_copy(
                update={
                    "stage": protocol.UpdateStage.FAILED,
                    "error": error,
                    "durations": durations,
                    "finished_at": _now(),
                }
            )
        )

    def _p2p_source(self, version: str) -> protocol.P2PSource:
        digest = hashlib.sha256(f"{self.pod}/{version}".encode()).hexdigest()
        return protocol.P2PSource(
            endpoint=f"{self.host}:{self.port + 1}",
            version=version,
            buffers=(protocol.P2PBuffer(segment=0, address=1 << 32, nbytes=self.model_bytes),),
            layout_address=1 << 30,
            layout_nbytes=4096,
            layout_sha256=digest,
        )

    async def wait_status(self, after: int, timeout_s: float) -> protocol.AgentStatus:
        await self.changes.wait(after, min(timeout_s, protocol.MAX_STATUS_WAIT_SECONDS))
        return self.status()


# ---- HTTP --------------------------------------------------------------------------------------------

AGENT: web.AppKey[SimAgent] = web.AppKey("agent", SimAgent)
COUNTS: web.AppKey[Counter[str]] = web.AppKey("counts", Counter)


def _error(code: ErrorCode, message: str) -> web.Response:
    body = protocol.ErrorBody(error=code, message=message)
    return web.json_response(body.model_dump(mode="json"), status=HTTP_STATUS[code])


def _ok(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def _auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        request.app[COUNTS][f"{request.method} {route.canonical if route else request.path}"] += 1
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        try:
            return await handler(request)
        except Refused as e:
            return _error(e.code, str(e))
        except ValidationError as e:
            return web.json_response(
                protocol.ErrorBody(error=ErrorCode.BAD_REQUEST, message=str(e)).model_dump(mode="json"),
                status=422,
            )

    return auth


async def _status(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    query = protocol.StatusWait.model_validate(dict(request.query))
    if query.wait_for_change_after is None:
        return _ok(agent.status())
    return _ok(await agent.wait_status(query.wait_for_change_after, query.timeout_seconds))


async def _stage(request: web.Request) -> web.Response:
    req = protocol.StageRequest.model_validate_json(await request.read(), strict=True)
    return _ok(await request.app[AGENT].stage(req), 201)


async def _drop(request: web.Request) -> web.Response:
    request.app[AGENT].drop(request.match_info["version"])
    return web.Response(status=204)


async def _start_update(request: web.Request) -> web.Response:
    req = protocol.UpdateRequest.model_validate_json(await request.read(), strict=True)
    return _ok(request.app[AGENT].start_update(req), 202)


async def _get_update(request: web.Request) -> web.Response:
    found = request.app[AGENT].updates.get(request.match_info["id"])
    if found is None:
        return _error(ErrorCode.NOT_FOUND, f"no update with id {request.match_info['id']}")
    return _ok(found)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    st = request.app[AGENT].status()
    return web.Response(text="ready") if st.ready else web.Response(status=503, text="not ready")


async def _metrics(request: web.Request) -> web.Response:
    lines = [f'hotswap_sim_requests_total{{route="{k}"}} {v}' for k, v in sorted(request.app[COUNTS].items())]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _faults(request: web.Request) -> web.Response:
    body = SimFaults.model_validate_json(await request.read())
    request.app[AGENT].faults.queued.extend(body.faults)
    return web.json_response({"queued": len(request.app[AGENT].faults.queued)})


async def _counters(request: web.Request) -> web.Response:
    counts: Counter[str] = request.app[COUNTS]
    return web.json_response(dict(counts))


def build_app(agent: SimAgent, token: str) -> web.Application:
    app = web.Application(middlewares=[_auth(token)], client_max_size=1 << 20)
    app[AGENT] = agent
    app[COUNTS] = Counter()
    p = protocol.API_PREFIX
    app.router.add_get(f"{p}/status", _status)
    app.router.add_post(f"{p}/stage", _stage)
    app.router.add_delete(f"{p}/staged/{{version}}", _drop)
    app.router.add_post(f"{p}/updates", _start_update)
    app.router.add_get(f"{p}/updates/{{id}}", _get_update)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post(FAULTS_PATH, _faults)
    app.router.add_get(COUNTERS_PATH, _counters)
    return app


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hotswap_testing.sim_agent", description=__doc__)
    # The agent's flags that matter here (the operator passes them all; the rest are ignored).
    ap.add_argument("--pod-name", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    # The simulation's own.
    defaults = SimTimes()
    for name in ("stage", "connect", "transfer", "reload", "p2p", "engine_start"):
        flag = f"--sim-{name.replace('_', '-')}-seconds"
        ap.add_argument(flag, type=float, default=getattr(defaults, name))
    ap.add_argument("--sim-model-bytes", type=int, default=16 << 30)
    args, _ignored = ap.parse_known_args(argv)
    return args


async def serve(args: argparse.Namespace, token: str) -> None:
    times = SimTimes(
        stage=args.sim_stage_seconds,
        connect=args.sim_connect_seconds,
        transfer=args.sim_transfer_seconds,
        reload=args.sim_reload_seconds,
        p2p=args.sim_p2p_seconds,
        engine_start=args.sim_engine_start_seconds,
    )
    agent = SimAgent(args.pod_name, args.host, args.port, times, args.sim_model_bytes)
    runner = web.AppRunner(build_app(agent, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, shutdown_timeout=1.0).start()
    log.info("SIMULATED agent of pod %s on %s:%d (%s)", args.pod_name, args.host, args.port, times)
    engine = asyncio.create_task(agent.start_engine())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    engine.cancel()
    agent.changes.bump()  # answer the open long-polls now: a pod deletion must not wait on them
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    token = os.environ.get("HOTSWAP_AGENT_TOKEN", "")
    if not token:
        raise SystemExit("python -m hotswap_testing.sim_agent: HOTSWAP_AGENT_TOKEN is not set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args, token))


if __name__ == "__main__":
    main()
