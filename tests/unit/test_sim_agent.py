"""The agent stand-in (`hotswap_testing.sim_agent`) against the operator's own client: it must answer
like the agent (models, codes, auth, long-poll) or scale runs and operator tests measure a fiction.
In-process, on 127.0.0.1; no cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from hotswap_operator.agents import AgentClient, AgentConflict, AgentNotFound, AgentRefused
from hotswap_testing.sim_agent import SimAgent, SimFault, SimTimes, build_app

TIMES = SimTimes(stage=0.01, connect=0.01, transfer=0.02, reload=0.01, p2p=0.01)
SOURCE = protocol.Source(path="/checkpoints/ckpts/v1")


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimAgent, str]]:
    agent = SimAgent("pod-0", "127.0.0.1", 0, TIMES, model_bytes=1 << 20)
    runner = web.AppRunner(build_app(agent, "secret"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield agent, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def group(parts: int) -> protocol.BroadcastGroup:
    members = tuple(
        protocol.GroupMember(
            rank=i, pod=f"pod-{i}", address="127.0.0.1", part=protocol.PartSpec(index=i, count=parts)
        )
        for i in range(parts)
    )
    return protocol.BroadcastGroup(members=members, master_addr="127.0.0.1", master_port=29500)


async def test_a_broadcast_update_runs_through_the_agents_stages(sim: tuple[SimAgent, str]) -> None:
    agent, ep = sim
    async with AgentClient("secret", timeout_s=5, stage_timeout_s=5) as c:
        first = await c.status(ep)
        assert (first.pod, first.ready, first.engine_up, first.serving_version) == ("pod-0", True, True, None)
        part = protocol.PartSpec(index=0, count=2)
        staged = await c.stage(ep, protocol.StageRequest(version="v1", source=SOURCE, part=part))
        assert (staged.part, staged.complete, staged.bytes) == (part, False, 1 << 19)
        again = await c.stage(ep, protocol.StageRequest(version="v1", source=SOURCE, part=part))
        assert again == staged  # idempotent, like the agent
        after_stage = await c.wait_status(ep, first.sequence, 5)  # the long-poll answers on a change
        assert after_stage.sequence > first.sequence and after_stage.staged == (staged,)

        progress = await c.start_update(ep, protocol.UpdateRequest(version="v1", rank=0, group=group(2)))
        with pytest.raises(AgentConflict):  # one update at a time
            await c.start_update(ep, protocol.UpdateRequest(version="v1", rank=0, group=group(2)))
        done = await c.wait_update(ep, progress.id, timeout_s=5, poll_s=0.01)
        assert done.stage is protocol.UpdateStage.COMPLETE
        assert set(done.durations) == {"connect", "transfer", "reload", "total"}
        st = await c.status(ep)
        assert st.serving_version == "v1" and st.ready
        (full,) = st.staged
        assert full.complete and full.p2p is not None  # a holder now: new pods may read it p2p

        with pytest.raises(AgentNotFound):
            await c.update(ep, "no-such-update")
        with pytest.raises(AgentNotFound):  # a broadcast of a version never staged
            await c.start_update(ep, protocol.UpdateRequest(version="v9", rank=0, group=group(2)))
        with pytest.raises(AgentRefused) as wrong_pod:
            await c.start_update(ep, protocol.UpdateRequest(version="v1", rank=1, group=group(2)))
        assert wrong_pod.value.code is ErrorCode.BAD_REQUEST
    async with AgentClient("wrong", timeout_s=5, stage_timeout_s=5) as bad:
        with pytest.raises(AgentRefused) as denied:
            await bad.status(ep)
        assert (denied.value.status, denied.value.code, denied.value.permanent) == (
            401,
            ErrorCode.UNAUTHORIZED,
            True,
        )
    assert agent.status().serving_version == "v1"


async def test_failures_on_command(sim: tuple[SimAgent, str]) -> None:
    agent, ep = sim
    agent.faults.queued += [
        SimFault(action="Stage", code=ErrorCode.INTERNAL, times=2),
        SimFault(action="Stage", code=ErrorCode.CHECKPOINT_MISMATCH, version="bad"),
        SimFault(action="Update", at=protocol.UpdateStage.RELOADING, version="v2"),
    ]
    async with AgentClient("secret", timeout_s=5, stage_timeout_s=5) as c:
        req = protocol.StageRequest(version="v2", source=SOURCE)
        for _ in range(2):  # transient: the operator retries these
            with pytest.raises(AgentRefused) as transient:
                await c.stage(ep, req)
            assert (transient.value.status, transient.value.permanent) == (500, False)
        assert (await c.stage(ep, req)).complete  # the third try goes through
        with pytest.raises(AgentRefused) as permanent:
            await c.stage(ep, protocol.StageRequest(version="bad", source=SOURCE))
        assert (permanent.value.status, permanent.value.code, permanent.value.permanent) == (
            422,
            ErrorCode.CHECKPOINT_MISMATCH,
            True,
        )
        alone = protocol.BroadcastGroup(
            members=(protocol.GroupMember(rank=0, pod="pod-0", address="127.0.0.1", part=None),),
            master_addr="127.0.0.1",
            master_port=29500,
        )
        p = await c.start_update(ep, protocol.UpdateRequest(version="v2", rank=0, group=alone))
        failed = await c.wait_update(ep, p.id, timeout_s=5, poll_s=0.01)
        assert failed.stage is protocol.UpdateStage.FAILED
        assert failed.error == "simulated failure while Reloading" and "rollback" in failed.durations
        st = await c.status(ep)
        assert st.serving_version is None and st.ready  # rolled back to what it served
