"""The agent's HTTP API (aiohttp): thin routes over `AgentService`, models from `protocol`.

The routes are `openapi.ROUTES` (each handler here is named by its operation id), so what is served
and what `GET /openapi.json` documents cannot drift apart. Every route but /healthz, /readyz,
/metrics and /openapi.json needs `Authorization: Bearer <token>`; the token is per pool and the
operator keeps it in a Secret. Every error is an `ErrorBody` (aiohttp's own 404/405/413 too).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from hotswap_engine.agent import openapi
from hotswap_engine.agent.errors import AgentError, BadRequest
from hotswap_engine.agent.service import AgentService

log = logging.getLogger(__name__)
SERVICE: web.AppKey[AgentService] = web.AppKey("service", AgentService)
OPEN_PATHS = openapi.OPEN_PATHS
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 1 << 20


def _error(status: int, code: ErrorCode, message: str) -> web.Response:
    body = protocol.ErrorBody(error=code, message=message)
    return web.json_response(body.model_dump(mode="json"), status=status)


def _ok(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def make_auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        try:
            return await handler(request)
        except AgentError as e:
            return _error(e.status, e.code, str(e))
        except ValidationError as e:
            return _error(422, ErrorCode.BAD_REQUEST, _validation_message(e))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            # aiohttp's own answers (no such route, method not allowed, body too large) in our shape
            code = ErrorCode.NOT_FOUND if e.status == 404 else ErrorCode.BAD_REQUEST
            reply = _error(e.status, code, e.reason)
            if "Allow" in e.headers:
                reply.headers["Allow"] = e.headers["Allow"]
            return reply
        except Exception as e:  # the API must answer, not drop the connection
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error(500, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")

    return auth


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def _body(request: web.Request, model: type[M]) -> M:
    """The request's JSON body as `model`, strictly: the types the OpenAPI document states and no
    others (lax parsing took `"1"` for an integer and `"1.5"` for a number). An empty body, invalid
    JSON or UTF-8 are `ValidationError`s too (422)."""
    return model.model_validate_json(await request.read(), strict=True)


async def status(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    query = _query(request, protocol.StatusWait)
    if query.wait_for_change_after is None:
        await svc.check_engine()
        return _ok(svc.status())
    return _ok(await svc.wait_status(query.wait_for_change_after, query.timeout_seconds))


def _query(request: web.Request, model: type[M]) -> M:
    """The query string as `model` (numbers from their text; a repeated key is refused)."""
    repeated = sorted({k for k in request.query if len(request.query.getall(k)) > 1})
    if repeated:
        raise BadRequest(f"invalid request: query parameter(s) given more than once: {', '.join(repeated)}")
    return model.model_validate(dict(request.query))


async def stage(request: web.Request) -> web.Response:
    req = await _body(request, protocol.StageRequest)
    staged = await request.app[SERVICE].stage(req)
    return _ok(staged, 201)


async def drop_staged(request: web.Request) -> web.Response:
    request.app[SERVICE].drop(request.match_info["version"])
    return web.Response(status=204)


async def start_update(request: web.Request) -> web.Response:
    req = await _body(request, protocol.UpdateRequest)
    progress = await request.app[SERVICE].start_update(req)
    return _ok(progress, 202)


async def get_update(request: web.Request) -> web.Response:
    return _ok(request.app[SERVICE].get_update(request.match_info["id"]))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    # A restarted engine (base weights) must fail the probe now, not at the next status poll.
    await request.app[SERVICE].check_engine()
    st = request.app[SERVICE].status()
    if st.ready:
        return web.Response(text="ready")
    return web.Response(status=503, text=st.last_error or "not ready")


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[SERVICE].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _openapi_handler() -> Handler:
    text = openapi.render()  # generated once per app: the document is a function of the code

    async def serve_openapi(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="application/json")

    return serve_openapi


def build_app(service: AgentService, token: str) -> web.Application:
    app = web.Application(middlewares=[make_auth_middleware(token)], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    handlers: dict[str, Handler] = {
        "status": status,
        "stage": stage,
        "drop_staged": drop_staged,
        "start_update": start_update,
        "get_update": get_update,
        "healthz": healthz,
        "readyz": readyz,
        "metrics": metrics,
        "openapi": _openapi_handler(),
    }
    assert set(handlers) == {r.operation_id for r in openapi.ROUTES}, "a route without a handler"
    for r in openapi.ROUTES:
        if r.method == "get":  # with HEAD, as aiohttp's `web.get` has always added
            app.router.add_get(r.path, handlers[r.operation_id])
        else:
            app.router.add_route(r.method.upper(), r.path, handlers[r.operation_id])
    return app
