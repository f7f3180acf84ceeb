"""The operator's agent client against the real agent HTTP API (aiohttp app + AgentService) on loopback.

The agent's byte-moving runner is replaced by one that stages with the real `staging` module but has
no vLLM engine attached, so updates fail the way an update fails (and roll back): what is under test
is the client — auth, models, status codes mapped to exceptions carrying the agent's message — and
the agent's API state machine it talks to. Updates that really apply are covered by the e2e tests.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from hotswap_engine import staging
from hotswap_engine.agent.api import build_app
from hotswap_engine.agent.errors import BadRequest
from hotswap_engine.agent.service import AgentService, as_api_error
from hotswap_engine.agent.settings import AgentSettings
from hotswap_operator.agents import (
    AgentClient,
    AgentConflict,
    AgentNotFound,
    AgentRefused,
    AgentUnreachable,
)
from hotswap_testing.checkpoints import random_filler, save_file

TOKEN = "t0ken-for-tests"


def agent_client(token: str = TOKEN, timeout_s: float = 10.0) -> AgentClient:
    return AgentClient(token, timeout_s=timeout_s, stage_timeout_s=60.0)


DEFS = [("a.weight", "F32", (16, 8)), ("b.weight", "F32", (8,)), ("c.weight", "BF16", (4, 4))]


class StorageOnlyRunner:
    """Stages for real; has no engine to apply to (an update fails like a broken engine would)."""

    p2p_endpoint: str | None = None
    must_exit = False

    def __init__(self, cfg: AgentSettings) -> None:
        self.cfg = cfg
        self.expected = [loc.spec for loc in staging.read_index(cfg.base_checkpoint)]
        self.updates_started = asyncio.Event()
        self.release = asyncio.Event()

    def stage(self, source: protocol.Source, part: protocol.PartSpec | None, full: bool = False) -> Any:
        return staging.stage(
            source.path,
            part,
            self.cfg.allowed_root,
            self.expected,
            manifest=source.sha256_manifest,
            pinned=False,
        )

    async def update(self, req: protocol.UpdateRequest, data: Any, rec: Any) -> Any:
        self.updates_started.set()
        await self.release.wait()
        raise RuntimeError("no inference engine attached to this agent")

    async def apply_local(self, version: str | None, data: Any) -> None:
        return None

    def publish(self, version: str, full: Any) -> None:
        return None

    def withdraw(self, version: str) -> None:
        return None

    def close(self) -> None:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    save_file(tmp_path / "base.safetensors", DEFS, random_filler(1))
    save_file(tmp_path / "v2.safetensors", DEFS, random_filler(2))
    save_file(tmp_path / "wrong.safetensors", [("a.weight", "F32", (2, 2))], random_filler(3))
    return tmp_path


@pytest.fixture
async def agent(root: Path) -> AsyncIterator[tuple[str, StorageOnlyRunner]]:
    port = free_port()
    cfg = AgentSettings(
        pod_name="pod-a",
        host="127.0.0.1",
        port=port,
        token=TOKEN,
        base_checkpoint=root / "base.safetensors",
        allowed_root=[root],
        control_socket=root / "control.sock",
        handoff_endpoint="tcp://127.0.0.1:1",
    )
    runner = StorageOnlyRunner(cfg)
    service = AgentService(cfg, runner)  # type: ignore[arg-type]
    app_runner = web.AppRunner(build_app(service, TOKEN), access_log=None)
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        runner.release.set()
        await app_runner.cleanup()
        await service.close()


def src(root: Path, name: str) -> protocol.Source:
    return protocol.Source(path=str(root / name))


async def test_status_stage_idempotent_and_drop(agent: tuple[str, StorageOnlyRunner], root: Path) -> None:
    url, _ = agent
    async with agent_client() as c:
        st = await c.status(url)
        assert (st.pod, st.serving_version, st.ready, st.staged) == ("pod-a", None, True, ())
        part = protocol.PartSpec(index=1, count=2)
        req = protocol.StageRequest(version="v2", source=src(root, "v2.safetensors"), part=part)
        got = await c.stage(url, req)
        assert (got.version, got.part, got.complete) == ("v2", part, False)
        assert got.bytes > 0 and got.tensors >= 1
        assert await c.stage(url, req) == got  # the operator repeats requests after a restart
        assert [s.version for s in (await c.status(url)).staged] == ["v2"]
        await c.drop_staged(url, "v2")
        assert (await c.status(url)).staged == ()
        with pytest.raises(AgentNotFound, match="version v2 is not staged here") as e:
            await c.drop_staged(url, "v2")
        assert e.value.status == 404 and e.value.code == ErrorCode.NOT_FOUND and not e.value.permanent
        assert await c.healthz(url)
        assert "hotswap_agent" in await c.metrics(url)


async def test_refusals_carry_the_agents_message(agent: tuple[str, StorageOnlyRunner], root: Path) -> None:
    url, _ = agent
    async with agent_client() as c:
        with pytest.raises(AgentRefused) as e:
            await c.stage(url, protocol.StageRequest(version="v9", source=src(root, "wrong.safetensors")))
        assert e.value.code == ErrorCode.CHECKPOINT_MISMATCH and e.value.permanent
        assert "b.weight" in e.value.message  # the agent lists what is missing
        with pytest.raises(AgentRefused) as e:
            await c.stage(
                url, protocol.StageRequest(version="v9", source=protocol.Source(path="/etc/hostname"))
            )
        assert e.value.code == ErrorCode.FORBIDDEN_PATH and e.value.status == 403 and e.value.permanent
        # a missing checkpoint fails the WeightVersion (the controller treats a 404 on stage as final)
        with pytest.raises(AgentNotFound, match="does not exist"):
            await c.stage(url, protocol.StageRequest(version="v9", source=src(root, "missing.safetensors")))
    async with agent_client("wrong-token") as bad:
        with pytest.raises(AgentRefused) as e:
            await bad.status(url)
        assert (e.value.status, e.value.code) == (401, ErrorCode.UNAUTHORIZED)
        assert "bearer token" in str(e.value)
        assert await bad.healthz(url)  # open route


def broadcast_alone(version: str, pod: str = "pod-a") -> protocol.UpdateRequest:
    group = protocol.BroadcastGroup(
        members=(protocol.GroupMember(rank=0, pod=pod, address="127.0.0.1", part=None),),
        master_addr="127.0.0.1",
        master_port=free_port(),
    )
    return protocol.UpdateRequest(version=version, rank=0, group=group, timeout_seconds=30)


async def test_update_lifecycle_conflict_and_failure(
    agent: tuple[str, StorageOnlyRunner], root: Path
) -> None:
    url, runner = agent
    async with agent_client() as c:
        with pytest.raises(AgentNotFound, match="not staged here"):
            await c.start_update(url, broadcast_alone("v2"))
        await c.stage(url, protocol.StageRequest(version="v2", source=src(root, "v2.safetensors")))
        with pytest.raises(AgentRefused) as e:
            await c.start_update(url, broadcast_alone("v2", pod="pod-b"))
        assert e.value.code == ErrorCode.BAD_REQUEST and "belongs to pod pod-b" in e.value.message
        started = await c.start_update(url, broadcast_alone("v2"))
        assert started.version == "v2" and not started.done
        await asyncio.wait_for(runner.updates_started.wait(), 10)
        # A second request while one runs (an operator that restarted and sends again): 409.
        with pytest.raises(AgentConflict, match="still running"):
            await c.start_update(url, broadcast_alone("v2"))
        running = await c.status(url)
        assert running.update is not None and running.update.id == started.id and not running.ready
        runner.release.set()
        final = await c.wait_update(url, started.id, timeout_s=10, poll_s=0.05)
        assert final.stage is protocol.UpdateStage.FAILED
        assert final.error is not None and "no inference engine attached" in final.error
        assert final.error_code is None  # an unclassified failure: the operator may retry it
        after = await c.status(url)
        assert after.serving_version is None and after.ready  # rolled back to what it served
        with pytest.raises(AgentNotFound, match="no update with id nope"):
            await c.update(url, "nope")


async def test_a_permanent_update_failure_carries_its_error_code(
    agent: tuple[str, StorageOnlyRunner], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update that fails for a reason the agent classes as permanent (here: the bytes do not fit
    the model) says so in `error_code`, so the operator fails the version instead of retrying."""
    url, runner = agent

    async def mismatched(req: protocol.UpdateRequest, data: Any, rec: Any) -> Any:
        raise staging.StagingError("tensor a.weight has shape (2, 2), the model's is (16, 8)")

    monkeypatch.setattr(runner, "update", mismatched)
    async with agent_client() as c:
        await c.stage(url, protocol.StageRequest(version="v2", source=src(root, "v2.safetensors")))
        started = await c.start_update(url, broadcast_alone("v2"))
        final = await c.wait_update(url, started.id, timeout_s=10, poll_s=0.05)
    assert final.stage is protocol.UpdateStage.FAILED
    assert final.error_code is ErrorCode.CHECKPOINT_MISMATCH and final.error_code.permanent
    assert final.error is not None and "shape (2, 2)" in final.error


async def test_unreachable_and_silent_agents() -> None:
    async with agent_client(timeout_s=0.5) as c:
        with pytest.raises(AgentUnreachable):
            await c.status(f"http://127.0.0.1:{free_port()}")
        assert not await c.healthz(f"http://127.0.0.1:{free_port()}")

        released = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await released.wait()  # never answers; the connection closes when the test is done
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(AgentUnreachable, match="Timeout"):
                await c.status(f"http://127.0.0.1:{port}")
        finally:
            released.set()
            server.close()


# ---- error classification: bad input is a 4xx with its own code, anything else a 500 ---------------


async def test_control_characters_in_a_path_are_bad_requests(
    agent: tuple[str, StorageOnlyRunner], root: Path
) -> None:
    url, _ = agent
    for path in (f"{root}/v2\x00.safetensors", f"{root}/v2\n.safetensors"):
        unchecked = protocol.Source.model_construct(path=path, sha256_manifest=None)
        req = protocol.StageRequest.model_construct(version="v2", source=unchecked, part=None)
        async with agent_client() as c:
            with pytest.raises(AgentRefused, match=r"source\.path") as e:
                await c.stage(url, req)
        assert (e.value.status, e.value.code, e.value.permanent) == (422, ErrorCode.BAD_REQUEST, True)


def test_a_path_the_os_refuses_is_an_invalid_path(root: Path) -> None:
    with pytest.raises(staging.InvalidPath, match="control characters"):
        staging.check_path(root / "v2\x00.safetensors", [root])
    err = as_api_error(staging.InvalidPath("x"))
    assert isinstance(err, BadRequest) and (err.status, err.code) == (400, ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OSError(errno.EIO, "Input/output error"), 500, ErrorCode.INTERNAL),
        # host memory or a staging filesystem full: transient, retried with backoff
        (OSError(errno.ENOSPC, "No space left on device"), 500, ErrorCode.INTERNAL),
        (staging.CheckpointChanged("m.safetensors changed while it was being read"), 409, ErrorCode.CONFLICT),
    ],
)
async def test_unexpected_stage_error_is_transient(
    agent: tuple[str, StorageOnlyRunner],
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    status: int,
    code: ErrorCode,
) -> None:
    url, runner = agent

    def broken(source: protocol.Source, part: protocol.PartSpec | None, full: bool = False) -> Any:
        raise error

    monkeypatch.setattr(runner, "stage", broken)
    req = protocol.StageRequest(version="v2", source=src(root, "v2.safetensors"))
    async with agent_client() as c:
        with pytest.raises(AgentRefused) as e:
            await c.stage(url, req)
        assert str(error.args[-1]) in e.value.message
        assert (e.value.status, e.value.code, e.value.permanent) == (status, code, False)
        after = await c.status(url)
    assert after.staged == () and after.ready  # nothing half-staged is kept


async def test_staging_a_version_again_from_another_source_replaces_it(
    agent: tuple[str, StorageOnlyRunner], root: Path
) -> None:
    url, _ = agent
    save_file(root / "v2b.safetensors", DEFS, random_filler(4))
    async with agent_client() as c:
        await c.stage(url, protocol.StageRequest(version="v2", source=src(root, "v2.safetensors")))
        again = protocol.StageRequest(version="v2", source=src(root, "v2b.safetensors"))
        got = await c.stage(url, again)
        assert got.source == src(root, "v2b.safetensors")
        assert [s.source for s in (await c.status(url)).staged] == [src(root, "v2b.safetensors")]


async def test_status_long_poll_answers_on_a_change_and_at_its_timeout(
    agent: tuple[str, StorageOnlyRunner], root: Path
) -> None:
    """`wait_status` (GET /status?wait_for_change_after=N) answers as soon as the agent's state moves
    past N — here a stage finishing, then each stage of an update — and with the unchanged status at
    its timeout otherwise."""
    url, runner = agent
    async with agent_client() as c:
        first = await c.status(url)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        same = await c.wait_status(url, first.sequence, timeout_s=0.3)
        assert same.sequence == first.sequence and loop.time() - t0 >= 0.3  # nothing changed

        # A waiter open before the stage answers because of it, long before its 30 s timeout.
        waiter = asyncio.create_task(c.wait_status(url, first.sequence, timeout_s=30))
        req = protocol.StageRequest(version="v2", source=src(root, "v2.safetensors"))
        await c.stage(url, req)
        staged = await asyncio.wait_for(waiter, 10)
        assert staged.sequence > first.sequence and [s.version for s in staged.staged] == ["v2"]

        # An update: started, then failed and rolled back: the waiter hears of its end.
        started = await c.start_update(url, broadcast_alone("v2"))
        await asyncio.wait_for(runner.updates_started.wait(), 10)
        running = await c.status(url)
        assert running.update is not None and running.update.id == started.id and not running.update.done
        waiter = asyncio.create_task(c.wait_status(url, running.sequence, timeout_s=30))
        runner.release.set()
        seen = await asyncio.wait_for(waiter, 10)
        assert seen.sequence > running.sequence
        st = seen
        while st.update is None or not st.update.done:  # each answer is a stage change, not a timeout
            st = await asyncio.wait_for(c.wait_status(url, st.sequence, timeout_s=30), 10)
        assert st.update.stage is protocol.UpdateStage.FAILED and st.ready

        # A sequence the agent never had (it restarted and counts from 0 again): answered at once.
        t0 = loop.time()
        stale = await c.wait_status(url, st.sequence + 1000, timeout_s=30)
        assert stale.sequence == st.sequence and loop.time() - t0 < 10


@pytest.mark.parametrize(
    "query",
    [
        "wait_for_change_after=-1",
        "wait_for_change_after=x",
        "wait_for_change_after=1&timeout_seconds=0",
        "wait_for_change_after=1&timeout_seconds=61",
        "wait_for_change_after=1&timeout_seconds=nan",
        "wait_for_change_after=1&wait_for_change_after=2",
        "unknown=1",
    ],
)
async def test_bad_long_poll_queries_are_refused(agent: tuple[str, StorageOnlyRunner], query: str) -> None:
    url, _ = agent
    async with agent_client() as c, aiohttp.ClientSession() as http:
        before = await c.status(url)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(f"{url}/v1/status?{query}", headers=headers) as resp:
            body = protocol.ErrorBody.model_validate_json(await resp.read())
            assert resp.status in (400, 422) and body.error == ErrorCode.BAD_REQUEST, body
        assert (await c.status(url)).sequence == before.sequence  # and nothing changed
