"""Inference container entry point: vLLM's OpenAI server plus a private control socket.

    python -m hotswap_engine.inference.vllm_launcher --control-socket /run/hotswap/control.sock \
        MODEL [vllm serve args]

The OpenAI server is vLLM's own (the same calls `vllm serve` makes for a single API server:
`setup_server`, `build_async_engine_client`, `build_and_serve`), so every `vllm serve` flag
(`--host`, `--port`, ...) works unchanged. The launcher adds `--weight-transfer-config
'{"backend": "hotswap"}'` (hotswap_engine.inference.vllm_transfer_engine, registered by
hotswap_engine.inference.vllm_plugin) and the worker extension hotswap_engine.inference.vllm_ext.
Next to the server, in the same event loop, an aiohttp server on a unix socket (never TCP) offers:

  POST /apply  {"endpoint": str, "version": str, "policy": "Keep"|"Wait"|"Abort", "timeout": float?,
                "digests": bool?}  (`hotswap_api.launcher.ApplyRequest`)
               pause generation (vLLM's pause_generation with that mode, caches cleared: prefix blocks
               computed with the old weights must not serve the new ones), then vLLM's weight-transfer
               lifecycle through the engine client: start_weight_update, update_weights (every worker
               receives the version from the agent's hand-off endpoint), finish_weight_update with the
               version (vLLM's get_weight_version then reports it), resume. With "digests": true each
               worker's result carries `received` {tensor: fingerprint} of the bytes it received
               (hotswap_engine.received_digests compares them with the version's manifest).
               200 {"ok": true, "version", "seconds", "workers": [...]}; 409 while another apply runs;
               400 for a bad body; 500 {"ok": false, "error"} when the update failed. After a failure
               generation stays PAUSED: the weights may be half new, and serving them would break the
               promise that no request runs on half-applied weights. The next successful /apply
               (normally the agent re-sending the previous version) resumes it.
  GET  /healthz {"ok", "engine_alive", "paused", "applying", "version", "weight_version", "last_error",
                "restarted_from"}
               (`weight_version`: vLLM's get_weight_version, null on a vLLM without it;
               `restarted_from`: see "A restarted container" below)
  GET  /digests  {"version", "workers": [{"param:<name>": fingerprint, "buffer:<name>": ...}, ...]}
               fingerprints (hotswap_engine.digest) of every parameter and buffer of each worker's
               model; 409 while an apply runs.
  GET  /checksums {"version", "source": "vllm"|"hotswap", "workers": [{"<worker key><name>": sha256}, ...]}
               vLLM's compute_weight_checksums of the processed parameters (fleet verification,
               level b: the agent reports them, the operator compares them across the pool's pods);
               on a vLLM without it (0.26) the same sha256 per parameter through the worker extension
               (`source: "hotswap"`). 409 while an apply runs.

A restarted container: vLLM always starts on the base checkpoint (its MODEL argument). If this
container served another version before it was restarted (killed, OOM, a crash), answering from the
base weights would serve stale weights behind a pod that Kubernetes still routes to: the pod's
readiness gate says the pod serves the pool's version until the operator learns otherwise. So every
successful apply records its version in a file next to the control socket (the pod's memory volume:
it survives container restarts and dies with the pod), and a launcher that finds a version there at
start pauses generation before the OpenAI server answers anything: requests wait, none is answered
from base weights. `/healthz` reports that version as `restarted_from`; the next successful /apply
(the agent re-applying it from its host copy, or the operator's catch-up) resumes. Applying the base
checkpoint (version `base`) clears the record: a restart then serves exactly what was served.

The socket lives in a volume shared only with the engine container; its file mode (0660) is the
access control. vLLM's development routes (`VLLM_SERVER_DEV_MODE`: /collective_rpc, /pause, and the
weight-transfer routes) would expose the same powers on the public port, so the launcher refuses to
start with them on. A vLLM without the weight-transfer lifecycle (older than
vllm_plugin.MIN_VLLM_VERSION) is refused at start with a message naming the minimum version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from hotswap_api.labels import BASE_VERSION
from hotswap_api.launcher import ApplyRequest, BadApplyRequest

from hotswap_engine.inference import vllm_plugin

# Under "vllm." so vLLM's logging setup (handler, format, VLLM_LOGGING_LEVEL) covers these lines.
log = logging.getLogger("vllm.hotswap.launcher")

DEFAULT_CONTROL_SOCKET = "/run/hotswap/control.sock"
SERVED_VERSION_FILE = "served-version"  # next to the control socket (see "A restarted container")
EXTENSION = "hotswap_engine.inference.vllm_ext.HotswapWorkerExtension"
WEIGHT_TRANSFER_CONFIG = {"backend": vllm_plugin.BACKEND}
# collective_rpc's own deadline sits past the workers' hand-off timeout, so a stuck hand-off
# surfaces as the workers' precise error rather than a bare RPC timeout.
RPC_MARGIN_S = 30.0


class ControlServer:
    """The unix-socket API; `engine` is vLLM's EngineClient (AsyncLLM)."""

    def __init__(self, engine: Any, socket_path: str) -> None:
        self.engine = engine
        self.socket_path = socket_path
        self.served_path = Path(socket_path).with_name(SERVED_VERSION_FILE)
        self.version: str | None = None
        self.last_error: str | None = None
        # The version this container's previous run served, when it was not the base checkpoint:
        # generation stays paused until an apply succeeds (see "A restarted container").
        self.restarted_from: str | None = None
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        # vLLM 0.26 has no weight version: finish_weight_update takes no argument there.
        self._versioned = "weight_version" in inspect.signature(engine.finish_weight_update).parameters
        # An update session a failed or timed-out apply may have left open in some worker: vLLM
        # refuses to start another until it is finished, so the next apply finishes it first.
        self._session_maybe_open = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/apply", self.handle_apply)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/digests", self.handle_digests)
        app.router.add_get("/checksums", self.handle_checksums)
        return app

    async def start(self) -> None:
        init_request, _ = _lifecycle_requests()
        # Nothing to rendezvous (each update names its hand-off endpoint); vLLM requires the call.
        await self.engine.init_weight_transfer_engine(init_request(init_info={}))
        self.restarted_from = read_served_version(self.served_path)
        if self.restarted_from is not None:
            # Before the OpenAI server starts (serve() calls this first): no request is ever
            # answered from the base weights this engine just loaded.
            await self.engine.pause_generation(mode="abort", clear_cache=True)
            log.warning(
                "this container served %s before it restarted; the engine holds the base checkpoint, "
                "so generation stays paused until that version (or another) is applied again",
                self.restarted_from,
            )
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a previous run of this container
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(path)).start()
        os.chmod(path, 0o660)
        log.info("hotswap control socket on %s", path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket_path).unlink()

    async def handle_healthz(self, request: web.Request) -> web.Response:
        alive = True
        try:
            await self.engine.check_health()
        except Exception:
            alive = False
        paused = weight_version = None
        with contextlib.suppress(Exception):
            paused = bool(await self.engine.is_paused())
        if self._versioned:
            with contextlib.suppress(Exception):
                weight_version = await self.engine.get_weight_version()
        body = {
            "ok": alive,
            "engine_alive": alive,
            "paused": paused,
            "applying": self._lock.locked(),
            "version": self.version,
            "weight_version": weight_version,
            "last_error": self.last_error,
            "restarted_from": self.restarted_from,
        }
        return web.json_response(body, status=200 if alive else 503)

    async def handle_digests(self, request: web.Request) -> web.Response:
        if self._lock.locked():
            return web.json_response({"ok": False, "error": "an apply is running"}, status=409)
        async with self._lock:
            result = await self.engine.collective_rpc("hotswap_digests", timeout=RPC_MARGIN_S * 4)
        workers = list(result) if isinstance(result, list | tuple) else [result]
        return web.json_response({"ok": True, "version": self.version, "workers": workers})

    async def handle_checksums(self, request: web.Request) -> web.Response:
        if self._lock.locked():
            return web.json_response({"ok": False, "error": "an apply is running"}, status=409)
        async with self._lock:
            try:
                workers, source = await self.checksums()
            except Exception as e:
                return web.json_response({"ok": False, "error": f"{type(e).__name__}: {e}"}, status=500)
        return web.json_response({"ok": True, "version": self.version, "source": source, "workers": workers})

    async def checksums(self) -> tuple[list[dict[str, str]], str]:
        """vLLM's own per-parameter checksums where it has them (0.32+), else the extension's equal."""
        compute = getattr(self.engine, "compute_weight_checksums", None)
        if compute is not None:
            return [dict(w) for w in await compute()], "vllm"
        result = await self.engine.collective_rpc("hotswap_checksums", timeout=RPC_MARGIN_S * 4)
        workers = list(result) if isinstance(result, list | tuple) else [result]
        return [dict(w) for w in workers], "hotswap"

    async def handle_apply(self, request: web.Request) -> web.Response:
        try:
            req = ApplyRequest.from_json(await request.read())
        except BadApplyRequest as e:
            return web.json_response({"ok": False, "error": f"bad request: {e}"}, status=400)
        if self._lock.locked():
            return web.json_response({"ok": False, "error": "another apply is running"}, status=409)
        async with self._lock:
            start = time.perf_counter()
            try:
                workers = await self.apply(req)
            except Exception as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                self.last_error = error
                log.error("apply of %s failed (generation stays paused): %s", req.version, error)
                return web.json_response({"ok": False, "error": error}, status=500)
            seconds = time.perf_counter() - start
            self.version, self.last_error, self.restarted_from = req.version, None, None
            try:
                write_served_version(self.served_path, req.version)
            except OSError as e:  # the apply stands; only a later restart would not know it
                log.error("cannot record the served version in %s: %s", self.served_path, e)
            log.info("applied %s in %.3fs", req.version, seconds)
            return web.json_response(
                {"ok": True, "version": req.version, "seconds": seconds, "workers": workers}
            )

    async def apply(self, req: ApplyRequest) -> list[Any]:
        _, update_request = _lifecycle_requests()
        # pause_generation returns once the engine is idle under the policy (Wait drains in-flight
        # requests first), so nothing runs on the weights while they change; the lifecycle's calls
        # are executed by the engine core between steps.
        await asyncio.wait_for(
            self.engine.pause_generation(mode=req.policy.vllm_mode, clear_cache=True), req.timeout
        )
        await self._finish_stale_session()
        await asyncio.wait_for(self.engine.start_weight_update(), RPC_MARGIN_S)
        self._session_maybe_open = True
        info = {"endpoint": req.endpoint, "version": req.version, "timeout": req.timeout}
        if req.digests:
            info["digests"] = True
        # The workers' hand-off timeout bounds every wait inside; this deadline only catches a hang.
        await asyncio.wait_for(
            self.engine.update_weights(update_request(update_info=info)),
            req.timeout + RPC_MARGIN_S,
        )
        if self._versioned:
            finish = self.engine.finish_weight_update(weight_version=req.version)
        else:
            finish = self.engine.finish_weight_update()
        await asyncio.wait_for(finish, RPC_MARGIN_S)
        self._session_maybe_open = False
        reports = await self.engine.collective_rpc("hotswap_report", timeout=RPC_MARGIN_S)
        await self.engine.resume_generation()
        return list(reports) if isinstance(reports, list | tuple) else [reports]

    async def _finish_stale_session(self) -> None:
        if not self._session_maybe_open:
            return
        # Workers whose update raised have no session (vLLM ended it) and refuse; the others finish
        # theirs. Either way every worker is then outside a session.
        try:
            await asyncio.wait_for(self.engine.finish_weight_update(), RPC_MARGIN_S)
        except Exception as e:
            log.info("finishing the update session a failed apply left: %s", e)
        self._session_maybe_open = False


def read_served_version(path: Path) -> str | None:
    """The version a previous run of this container served (None: the base checkpoint, or none)."""
    try:
        version = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:  # unreadable: assume the worst (a version that is gone), and say so
        log.error("cannot read %s (%s): treating this start as a restart that lost its version", path, e)
        return "unknown"
    return version if version and version != BASE_VERSION else None


def write_served_version(path: Path, version: str) -> None:
    """Record what the engine now serves (atomically: a crash mid-write leaves the old record)."""
    if version == BASE_VERSION:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(version)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _InitRequest:
    init_info: dict[str, Any]


@dataclass(frozen=True)
class _UpdateRequest:
    update_info: dict[str, Any]


def _lifecycle_requests() -> tuple[Any, Any]:
    """vLLM's request types for init_weight_transfer_engine and update_weights; stand-ins with the
    same fields where vLLM is not installed (the tests' plain launcher, an engine without vLLM)."""
    try:
        from vllm.distributed.weight_transfer.base import (
            WeightTransferInitRequest,
            WeightTransferUpdateRequest,
        )
    except ImportError:
        return _InitRequest, _UpdateRequest
    return WeightTransferInitRequest, WeightTransferUpdateRequest


def _serve_api() -> Any:
    """vLLM's OpenAI-server entry points. They moved from `vllm.entrypoints.openai.*` (0.26, the
    release built for the GPU images' torch 2.11) to `vllm.entrypoints.launchers.*` (0.32); the
    functions and their signatures are the same in both."""
    import types

    try:
        from vllm.entrypoints.launchers import cli_args
        from vllm.entrypoints.launchers.api_server import entry
        from vllm.entrypoints.launchers.launcher import setup_server

        return types.SimpleNamespace(
            make_arg_parser=cli_args.make_arg_parser,
            validate_parsed_serve_args=cli_args.validate_parsed_serve_args,
            build_and_serve=entry.build_and_serve,
            build_async_engine_client=entry.build_async_engine_client,
            setup_server=setup_server,
        )
    except ImportError:
        import importlib

        api_server = importlib.import_module("vllm.entrypoints.openai.api_server")
        openai_cli_args = importlib.import_module("vllm.entrypoints.openai.cli_args")

        return types.SimpleNamespace(
            make_arg_parser=openai_cli_args.make_arg_parser,
            validate_parsed_serve_args=openai_cli_args.validate_parsed_serve_args,
            build_and_serve=api_server.build_and_serve,
            build_async_engine_client=api_server.build_async_engine_client,
            setup_server=api_server.setup_server,
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    api = _serve_api()
    make_arg_parser, validate_parsed_serve_args = api.make_arg_parser, api.validate_parsed_serve_args

    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI server with hotswap control"))
    parser.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET, help="unix socket path")
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    if args.worker_extension_cls and args.worker_extension_cls != EXTENSION:
        parser.error(f"--worker-extension-cls must be {EXTENSION} (or left out)")
    args.worker_extension_cls = EXTENSION
    backend = getattr(args.weight_transfer_config, "backend", vllm_plugin.BACKEND)
    if args.weight_transfer_config is not None and backend != vllm_plugin.BACKEND:
        parser.error(f"--weight-transfer-config must name backend {vllm_plugin.BACKEND!r} (or be left out)")
    args.weight_transfer_config = dict(WEIGHT_TRANSFER_CONFIG)
    if args.headless or (args.api_server_count or 1) != 1:
        parser.error("the launcher runs exactly one API server (no --headless / --api-server-count)")
    validate_parsed_serve_args(args)
    return args


async def serve(args: argparse.Namespace) -> None:
    """`vllm serve`'s single-API-server path (run_server + run_server_worker) with the control
    server started once the engine client exists and stopped before the engine shuts down."""
    from vllm.utils.system_utils import decorate_logs

    api = _serve_api()
    build_and_serve, build_async_engine_client, setup_server = (
        api.build_and_serve,
        api.build_async_engine_client,
        api.setup_server,
    )

    decorate_logs("APIServer", skip_if_decorated=True)

    def _interrupt_init(*_: object) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)  # until uvicorn installs its own handlers

    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        control = ControlServer(engine_client, args.control_socket)
        await control.start()
        try:
            shutdown_task = await build_and_serve(engine_client, listen_address, sock, args)
        finally:
            await control.stop()
    try:
        await shutdown_task
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0"):
        sys.exit("refusing to start: VLLM_SERVER_DEV_MODE exposes weight/pause routes on the public port")
    try:
        vllm_plugin.check_vllm()
    except vllm_plugin.UnsupportedVllm as e:
        sys.exit(f"refusing to start: {e}")
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:  # new in vLLM 0.32; 0.26 configures logging from the environment only
        from vllm.logger import configure_logging_from_args
    except ImportError:
        pass
    else:
        configure_logging_from_args(args)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
