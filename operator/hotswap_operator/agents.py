"""Async client for the agent's HTTP API (models from `hotswap_api.protocol`).

Every call carries the pool's bearer token and a timeout; an answer the agent refuses becomes an
`AgentRefused` carrying the agent's own `ErrorBody` code and message, and a connection that fails becomes an
`AgentUnreachable`, so the caller can tell "the checkpoint is bad" (permanent) from "the pod is not
up yet" (retry).
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class AgentClientError(Exception):
    """Anything that went wrong talking to an agent."""

    @property
    def permanent(self) -> bool:
        """True when repeating the same request cannot succeed."""
        return False


class AgentUnreachable(AgentClientError):
    """No answer: connection refused, reset, or timed out."""


class AgentRefused(AgentClientError):
    """The agent answered with an error status (the server side raises `hotswap_engine.agent.errors.
    AgentError`; both carry the same `ErrorCode`)."""

    def __init__(self, status: int, code: ErrorCode, message: str, endpoint: str) -> None:
        super().__init__(f"{endpoint}: {code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.endpoint = endpoint

    @property
    def permanent(self) -> bool:
        # A missing checkpoint (404 on stage) cannot appear by retrying either; the caller knows
        # which route it called, so it treats not_found per route.
        return self.code.permanent


class AgentConflict(AgentRefused):
    """409: e.g. an update is already running (after an operator restart, the one it sent before)."""


class AgentNotFound(AgentRefused):
    """404: unknown update id, version not staged, checkpoint not found."""


class AgentClient:
    """One client per pool (one token); pods are addressed per call by their endpoint. The timeouts
    come from the operator's settings (`agent_timeout`, `stage_timeout`)."""

    def __init__(
        self,
        token: str,
        *,
        timeout_s: float,
        stage_timeout_s: float,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stage_timeout_s = stage_timeout_s
        self._stage_timeout = aiohttp.ClientTimeout(total=stage_timeout_s)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No connection limit (aiohttp's default is 100): every pod holds one status long-poll
            # open, and a Stage or StartUpdate must never queue behind them.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _call(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        body: BaseModel | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        auth: bool = True,
    ) -> tuple[int, bytes]:
        url = endpoint.rstrip("/") + path
        data = body.model_dump_json().encode() if body is not None else None
        headers = dict(self._headers) if auth else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._sess().request(
                method, url, data=data, headers=headers, timeout=timeout or self._timeout
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientConnectionError) as e:
            raise AgentUnreachable(f"{endpoint}: {type(e).__name__}: {e}") from e
        except aiohttp.ClientError as e:
            raise AgentUnreachable(f"{endpoint}: {type(e).__name__}: {e}") from e
        if status >= 400:
            raise _error(status, raw, endpoint)
        return status, raw

    @staticmethod
    def _parse(model: type[M], raw: bytes, endpoint: str) -> M:
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise AgentRefused(
                200, ErrorCode.INTERNAL, f"unexpected answer for {model.__name__}: {e}", endpoint
            ) from e

    async def status(self, endpoint: str) -> protocol.AgentStatus:
        _, raw = await self._call("GET", endpoint, f"{protocol.API_PREFIX}/status")
        return self._parse(protocol.AgentStatus, raw, endpoint)

    async def wait_status(self, endpoint: str, after: int, timeout_s: float) -> protocol.AgentStatus:
        """Long-poll: the status once its `sequence` differs from `after`, or after `timeout_s`
        (unchanged then). The request's own timeout is the wait plus the usual one."""
        wait = protocol.StatusWait(wait_for_change_after=after, timeout_seconds=timeout_s)
        query = f"?wait_for_change_after={after}&timeout_seconds={wait.timeout_seconds}"
        total = wait.timeout_seconds + (self._timeout.total or 10.0)
        _, raw = await self._call(
            "GET",
            endpoint,
            f"{protocol.API_PREFIX}/status{query}",
            timeout=aiohttp.ClientTimeout(total=total),
        )
        return self._parse(protocol.AgentStatus, raw, endpoint)

    async def stage(self, endpoint: str, req: protocol.StageRequest) -> protocol.StagedVersion:
        """Stage (synchronous on the agent: it answers once the bytes are in host memory).

        A 202 (staging accepted, still running) is also understood: the status is polled until the
        version shows up staged or the agent reports an error."""
        status, raw = await self._call(
            "POST", endpoint, f"{protocol.API_PREFIX}/stage", body=req, timeout=self._stage_timeout
        )
        if status != 202:
            return self._parse(protocol.StagedVersion, raw, endpoint)
        return await self._poll_staged(endpoint, req)

    async def _poll_staged(self, endpoint: str, req: protocol.StageRequest) -> protocol.StagedVersion:
        deadline = asyncio.get_running_loop().time() + self._stage_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            st = await self.status(endpoint)
            for s in st.staged:
                if s.version == req.version and (s.complete or s.part == req.part):
                    return s
            await asyncio.sleep(0.5)
        raise AgentUnreachable(f"{endpoint}: staging {req.version} did not finish in time")

    async def drop_staged(self, endpoint: str, version: str) -> None:
        await self._call("DELETE", endpoint, f"{protocol.API_PREFIX}/staged/{version}")

    async def start_update(self, endpoint: str, req: protocol.UpdateRequest) -> protocol.UpdateProgress:
        _, raw = await self._call("POST", endpoint, f"{protocol.API_PREFIX}/updates", body=req)
        return self._parse(protocol.UpdateProgress, raw, endpoint)

    async def update(self, endpoint: str, update_id: str) -> protocol.UpdateProgress:
        _, raw = await self._call("GET", endpoint, f"{protocol.API_PREFIX}/updates/{update_id}")
        return self._parse(protocol.UpdateProgress, raw, endpoint)

    async def wait_update(
        self, endpoint: str, update_id: str, *, timeout_s: float, poll_s: float = 0.5
    ) -> protocol.UpdateProgress:
        """Poll an update until it is Complete or Failed (or `timeout_s` passes: AgentUnreachable)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            p = await self.update(endpoint, update_id)
            if p.done:
                return p
            if loop.time() >= deadline:
                raise AgentUnreachable(f"{endpoint}: update {update_id} still {p.stage} after {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def healthz(self, endpoint: str) -> bool:
        try:
            await self._call("GET", endpoint, "/healthz", auth=False)
        except AgentClientError:
            return False
        return True

    async def metrics(self, endpoint: str) -> str:
        _, raw = await self._call("GET", endpoint, "/metrics", auth=False)
        return raw.decode()


def _error(status: int, raw: bytes, endpoint: str) -> AgentRefused:
    code, message = ErrorCode.INTERNAL, raw.decode(errors="replace").strip() or f"HTTP {status}"
    try:
        body = protocol.ErrorBody.model_validate_json(raw)
        code, message = body.error, body.message
    except ValidationError:
        try:  # not an ErrorBody (a proxy, an aiohttp default page): keep whatever text came
            parsed: Any = json.loads(raw)
            if isinstance(parsed, dict) and "message" in parsed:
                message = str(parsed["message"])
        except ValueError:
            pass
    cls = {409: AgentConflict, 404: AgentNotFound}.get(status, AgentRefused)
    return cls(status, code, message, endpoint)
