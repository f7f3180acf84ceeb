"""The agent's HTTP API (aiohttp): thin routes over `AgentService`, models from `protocol`.

Every route but /healthz, /readyz and /metrics needs `Authorization: Bearer <token>`; the token is
per pool and the operator keeps it in a Secret.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from hotswap_engine import protocol
from hotswap_engine.agent.errors import AgentError
from hotswap_engine.agent.service import AgentService

log = logging.getLogger(__name__)
SERVICE: web.AppKey[AgentService] = web.AppKey("service", AgentService)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
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
                return _error(401, "unauthorized", "missing or wrong bearer token")
        try:
            return await handler(request)
        except AgentError as e:
            return _error(e.status, e.code, str(e))
        except ValidationError as e:
            return _error(422, "bad_request", _validation_message(e))
        except web.HTTPException:
            raise
        except Exception as e:  # the API must answer, not drop the connection
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error(500, "internal", f"{type(e).__name__}: {e}")

    return auth


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    if not raw:
        raise ValidationError.from_exception_data(model.__name__, [])
    return model.model_validate_json(raw)


async def status(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    await svc.check_engine()
    return _ok(svc.status())


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
    st = request.app[SERVICE].status()
    if st.ready:
        return web.Response(text="ready")
    return web.Response(status=503, text=st.last_error or "not ready")


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[SERVICE].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(service: AgentService, token: str) -> web.Application:
    app = web.Application(middlewares=[make_auth_middleware(token)], client_max_size=1 << 20)
    app[SERVICE] = service
    p = protocol.API_PREFIX
    app.add_routes(
        [
            web.get(f"{p}/status", status),
            web.post(f"{p}/stage", stage),
            web.delete(f"{p}/staged/{{version}}", drop_staged),
            web.post(f"{p}/updates", start_update),
            web.get(f"{p}/updates/{{id}}", get_update),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    return app
