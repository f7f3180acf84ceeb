"""The agent's client for the inference container's control socket (served by
`hotswap_engine.inference.vllm_launcher`; its messages are `hotswap_api.launcher`'s).

Torch-free and vLLM-free: the agent imports it without pulling in the inference stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from hotswap_api.launcher import DEFAULT_APPLY_TIMEOUT_S, ApplyRequest
from hotswap_api.policy import RequestPolicy

# The agent's own deadline sits past the launcher's (pause + hand-off + RPC margin), so the
# launcher's precise error normally arrives before the client gives up.
CLIENT_MARGIN_S = 60.0


@dataclass(frozen=True)
class ApplyResult:
    ok: bool
    status: int  # HTTP status: 200 ok, 400 bad request, 409 busy, 500 failed
    seconds: float | None = None
    error: str | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)


class LauncherUnreachable(ConnectionError):
    """The control socket is missing or the launcher does not answer."""


def _connector(socket_path: str) -> aiohttp.UnixConnector:
    return aiohttp.UnixConnector(path=socket_path)


async def apply(
    socket_path: str,
    endpoint: str,
    version: str,
    policy: RequestPolicy = RequestPolicy.KEEP,
    timeout: float = DEFAULT_APPLY_TIMEOUT_S,
    *,
    digests: bool = False,
) -> ApplyResult:
    """POST /apply and wait for every worker to finish. A refused/failed apply is an ApplyResult with
    ok=False; only an unreachable or silent launcher raises (LauncherUnreachable). `digests`: each
    worker reports the fingerprints of the tensors it received (`received`, see received_digests)."""
    request = ApplyRequest(
        endpoint=endpoint, version=version, policy=policy, timeout=timeout, digests=digests
    )
    body = request.model_dump(mode="json")
    client_timeout = aiohttp.ClientTimeout(total=timeout * 2 + CLIENT_MARGIN_S)
    try:
        async with (
            aiohttp.ClientSession(connector=_connector(socket_path), timeout=client_timeout) as session,
            session.post("http://hotswap/apply", json=body) as resp,
        ):
            status = resp.status
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise LauncherUnreachable(f"control socket {socket_path}: {type(e).__name__}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError:
        return ApplyResult(False, status, error=f"non-JSON answer ({status}): {text[:200]}")
    if not isinstance(data, dict):
        return ApplyResult(False, status, error=f"unexpected answer ({status}): {text[:200]}")
    return ApplyResult(
        ok=bool(data.get("ok")) and status == 200,
        status=status,
        seconds=data.get("seconds"),
        error=data.get("error"),
        workers=list(data.get("workers") or []),
    )


async def healthz(socket_path: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET /healthz: {"ok", "engine_alive", "paused", "applying", "version", "last_error"}."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=_connector(socket_path), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get("http://hotswap/healthz") as resp,
        ):
            data = await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise LauncherUnreachable(f"control socket {socket_path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise LauncherUnreachable(f"control socket {socket_path}: unexpected answer {data!r}")
    return data


async def _workers(socket_path: str, route: str, timeout: float) -> list[dict[str, str]]:
    """GET a per-worker route of the control socket (`{"workers": [{name: value}, ...]}`)."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=_connector(socket_path), timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.get(f"http://hotswap{route}") as resp,
        ):
            status = resp.status
            data = await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise LauncherUnreachable(f"control socket {socket_path}: {type(e).__name__}: {e}") from e
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        raise LauncherUnreachable(f"control socket {socket_path}: {route} answered {status}: {data!r}")
    return [{str(k): str(v) for k, v in dict(w).items()} for w in data["workers"]]


async def digests(socket_path: str, timeout: float = 120.0) -> list[dict[str, str]]:
    """GET /digests: per worker, the fingerprint (hotswap_engine.digest) of every parameter
    ("param:<name>") and buffer ("buffer:<name>") as vLLM keeps it."""
    return await _workers(socket_path, "/digests", timeout)


async def checksums(socket_path: str, timeout: float = 600.0) -> list[dict[str, str]]:
    """GET /checksums: per worker, vLLM's compute_weight_checksums of the processed parameters
    ({"<worker key><name>": sha256}). Raises LauncherUnreachable when it cannot get them."""
    return await _workers(socket_path, "/checksums", timeout)
