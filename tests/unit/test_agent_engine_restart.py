"""The agent's reaction to a restarted inference container (AgentService.check_engine), with the
launcher's /healthz answers given and a runner that records applies. The processes themselves are in
tests/engine/test_engine_restart.py; this covers what a process test cannot place: several status
reads at once (the operator's long-poll, /readyz, a CLI) seeing one restart start one apply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_engine import launcher_client
from hotswap_engine.agent.service import AgentService, StagedEntry
from hotswap_engine.agent.settings import AgentSettings


class RecordingRunner:
    """What AgentService needs of the runner here: `apply_local`, held until `release` is set."""

    p2p_endpoint = None

    def __init__(self) -> None:
        self.applied: list[str | None] = []
        self.release = asyncio.Event()
        self.fail = False

    async def apply_local(self, version: str | None, full: Any) -> None:
        self.applied.append(version)
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the launcher went away again")


class FakeData:
    def release(self) -> None:
        pass


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[AgentService, RecordingRunner]]:
    cfg = AgentSettings(
        host="127.0.0.1",
        token="test-token",
        base_checkpoint=tmp_path / "base",
        allowed_root=[tmp_path],
        control_socket=tmp_path / "control.sock",
        handoff_endpoint="tcp://127.0.0.1:1",
    )
    runner = RecordingRunner()
    svc = AgentService(cfg, runner)  # type: ignore[arg-type]
    yield svc, runner
    runner.release.set()
    if svc._task is not None:
        await asyncio.gather(svc._task, return_exceptions=True)


def serving(svc: AgentService, version: str, staged: bool = True) -> None:
    """The agent as after a completed update to `version` (held in full when `staged`)."""
    svc._serving = version
    if staged:
        meta = protocol.StagedVersion(
            version=version,
            source=protocol.Source(path="/ckpt/v1"),
            part=None,
            complete=True,
            bytes=1,
            tensors=1,
        )
        svc._staged[version] = StagedEntry(meta, FakeData())  # type: ignore[arg-type]


def launcher_says(monkeypatch: pytest.MonkeyPatch, readers: int = 1, **health: Any) -> None:
    """The launcher's /healthz answers `health`; with `readers` > 1, no answer comes before that many
    reads are waiting for one (every reader has read before any acts: the race, made certain)."""
    barrier = asyncio.Barrier(readers)

    async def healthz(socket_path: str, timeout: float = 10.0) -> dict[str, Any]:
        await asyncio.wait_for(barrier.wait(), 10)
        return {"ok": True, "engine_alive": True, "paused": False, "version": None, **health}

    monkeypatch.setattr(launcher_client, "healthz", healthz)


async def test_one_restart_seen_by_many_reads_is_applied_again_once(
    service: tuple[AgentService, RecordingRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, runner = service
    serving(svc, "v1")
    launcher_says(monkeypatch, readers=5, paused=True, restarted_from="v1")
    await asyncio.gather(*(svc.check_engine() for _ in range(5)))
    assert runner.applied == ["v1"]
    assert not svc.status().ready  # out of traffic while it runs (the engine is paused meanwhile)
    runner.release.set()
    assert svc._task is not None
    await svc._task
    st = svc.status()
    assert (st.serving_version, st.ready, st.last_error) == ("v1", True, None)


async def test_a_failed_re_apply_reports_base_not_ready(
    service: tuple[AgentService, RecordingRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, runner = service
    serving(svc, "v1")
    launcher_says(monkeypatch, paused=True, restarted_from="v1")
    runner.fail = True
    runner.release.set()
    await svc.check_engine()
    assert svc._task is not None
    await svc._task
    st = svc.status()
    assert st.serving_version is None and not st.ready
    assert "re-applying v1 failed" in (st.last_error or "")


async def test_without_a_full_copy_the_agent_reports_base_and_waits_for_the_operator(
    service: tuple[AgentService, RecordingRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, runner = service
    serving(svc, "v1", staged=False)  # e.g. a part of a broadcast only
    launcher_says(monkeypatch, paused=True, restarted_from="v1")
    await svc.check_engine()
    st = svc.status()
    assert runner.applied == [] and st.serving_version is None and not st.ready
    assert "restarted" in (st.last_error or "")


async def test_an_agent_that_restarted_too_stays_not_ready_and_restores_nothing(
    service: tuple[AgentService, RecordingRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, runner = service  # a fresh agent: serves base as far as it knows
    launcher_says(monkeypatch, paused=True, restarted_from="v1")
    await svc.recover()  # on start: a paused engine is normally restored to base; not this one
    await svc.check_engine()
    st = svc.status()
    assert runner.applied == [] and svc._task is None
    assert st.serving_version is None and not st.ready and "v1" in (st.last_error or "")


async def test_a_launcher_that_restarted_on_what_was_served_changes_nothing(
    service: tuple[AgentService, RecordingRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, runner = service
    serving(svc, "v1")
    launcher_says(monkeypatch, version="v1")
    await svc.check_engine()
    st = svc.status()
    assert runner.applied == [] and (st.serving_version, st.ready) == ("v1", True)
