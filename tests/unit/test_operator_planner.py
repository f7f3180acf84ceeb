"""The planner over many fleet states: every decision the operator takes, without a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from hotswap_api.policy import RequestPolicy
from hotswap_api.resources import (
    ConditionStatus,
    InferencePoolSpec,
    InferencePoolStatus,
    Phase,
    SourceRef,
    WeightVersionSpec,
    WeightVersionStatus,
)
from hotswap_operator.planner import (
    DUE_SLACK_S,
    ActionFailure,
    DropStaged,
    Emit,
    Fleet,
    Plan,
    PlannerConfig,
    PodView,
    PruneVersions,
    Stage,
    StartUpdate,
    SyncPod,
    VersionView,
    backoff_s,
    condition,
    deadline,
    invalid_pool,
    invalid_pool_status,
    orphan_status,
    plan,
    prune_versions,
    set_condition,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
POOL = "llm"


def pool_spec(replicas: int = 2, **over: Any) -> InferencePoolSpec:
    raw: dict[str, Any] = {
        "replicas": replicas,
        "template": {"spec": {"containers": [{"name": "vllm", "image": "img"}]}},
        "model": {"path": "base-ckpt"},
        "checkpointVolume": {"source": {"hostPath": {"path": "/data"}}, "mountPath": "/ckpt"},
        "engine": {"device": "CPU", "port": 8600, "updateMemoryBudget": "64Mi"},
    }
    raw.update(over)
    return InferencePoolSpec.model_validate(raw)


def p2p_source(version: str, endpoint: str) -> protocol.P2PSource:
    return protocol.P2PSource(
        endpoint=endpoint,
        version=version,
        buffers=(protocol.P2PBuffer(segment=0, address=4096, nbytes=100),),
        layout_address=8192,
        layout_nbytes=10,
        layout_sha256="0" * 64,
    )


def staged(
    version: str, part: tuple[int, int] | None = None, seconds: float = 0.5, p2p: str | None = None
) -> protocol.StagedVersion:
    p = protocol.PartSpec(index=part[0], count=part[1]) if part else None
    return protocol.StagedVersion(
        p2p=p2p_source(version, p2p) if p2p else None,
        version=version,
        source=protocol.Source(path=f"/ckpt/ckpts/{version}"),  # the mount path + wv()'s source
        part=p,
        complete=p is None or p.count == 1,
        bytes=100,
        tensors=4,
        stage_seconds=seconds,
    )


def progress(
    version: str,
    stage: protocol.UpdateStage,
    uid: str = "u1",
    error: str | None = None,
    finished: datetime | None = None,
    durations: dict[str, float] | None = None,
    mode: protocol.UpdateMode = protocol.UpdateMode.BROADCAST,
) -> protocol.UpdateProgress:
    return protocol.UpdateProgress(
        id=uid,
        version=version,
        mode=mode,
        stage=stage,
        started_at=T0,
        finished_at=finished,
        error=error,
        durations=durations or {},
    )


def agent(
    name: str,
    serving: str | None = None,
    staged_: Sequence[protocol.StagedVersion] = (),
    update: protocol.UpdateProgress | None = None,
    ready: bool = True,
    p2p: str | None = None,
) -> protocol.AgentStatus:
    busy = update is not None and not update.done
    return protocol.AgentStatus(
        pod=name,
        serving_version=serving,
        ready=ready and not busy,
        staged=tuple(staged_),
        update=update,
        p2p_endpoint=p2p,
    )


def pod(
    name: str,
    ip: str,
    serving: str | None = None,
    *,
    gate: bool | None = True,
    label: str | None = None,
    ready: bool | None = None,
    running: bool = True,
    deleting: bool = False,
    agent_: protocol.AgentStatus | str | None = "auto",
    **agent_kw: Any,
) -> PodView:
    a = agent(name, serving, **agent_kw) if agent_ == "auto" else agent_
    assert not isinstance(a, str)
    return PodView(
        name=name,
        ip=ip,
        created=T0,
        running=running,
        deleting=deleting,
        ready=bool(gate) if ready is None else ready,
        gate=gate,
        label_version=label if label is not None else (serving or "base"),
        agent=a,
    )


def wv(
    version: str,
    *,
    created: datetime = T0,
    rv: str = "",
    status: WeightVersionStatus | None = None,
    strategy: str = "Broadcast",
    timeout: str = "10m",
    path: str | None = None,
) -> VersionView:
    spec = WeightVersionSpec.model_validate(
        {
            "poolRef": {"name": POOL},
            "version": version,
            "source": {"path": path or f"ckpts/{version}"},
            "strategy": strategy,
            "timeout": timeout,
        }
    )
    return VersionView(
        name=f"{POOL}-{version}",
        created=created,
        generation=1,
        spec=spec,
        status=status or WeightVersionStatus(),
        resource_version=rv,
    )


def fleet(
    pods: Sequence[PodView],
    versions: Sequence[VersionView] = (),
    *,
    spec: InferencePoolSpec | None = None,
    current: str | None = None,
    now: datetime = T0 + timedelta(seconds=5),
) -> Fleet:
    status = InferencePoolStatus(
        current_version=current, current_source=SourceRef(path=f"ckpts/{current}") if current else None
    )
    return Fleet(
        pool=POOL,
        generation=3,
        spec=spec or pool_spec(len(pods)),
        status=status,
        pods=tuple(pods),
        versions=tuple(versions),
        now=now,
    )


def of(p: Plan, kind: type) -> list[Any]:
    return [a for a in p.actions if isinstance(a, kind)]


def events(p: Plan) -> list[tuple[str, str]]:
    return [(e.name, e.reason) for e in of(p, Emit)]


def cond(st: WeightVersionStatus | InferencePoolStatus, type_: str) -> ConditionStatus | None:
    c = condition(st.conditions, type_)
    return c.status if c else None


def two_pods(serving: str | None = None, **kw: Any) -> list[PodView]:
    return [pod("llm-a", "127.0.0.11", serving, **kw), pod("llm-b", "127.0.0.12", serving, **kw)]


# ---- idle pools ----------------------------------------------------------------------------------------


def test_empty_pool_reports_selector_and_not_available() -> None:
    p = plan(fleet([], spec=pool_spec(2)))
    assert p.actions == ()
    st = p.pool_status
    assert (st.replicas, st.ready_replicas, st.updated_replicas) == (0, 0, 0)
    assert st.selector == "hotswap.dev/pool=llm"
    assert st.observed_generation == 3
    assert cond(st, "Available") is ConditionStatus.FALSE
    assert cond(st, "Progressing") is ConditionStatus.TRUE
    assert cond(st, "WeightsUpdating") is ConditionStatus.FALSE
    assert cond(st, "Degraded") is ConditionStatus.FALSE


def test_converged_pool_does_nothing_and_looks_again_later() -> None:
    p = plan(fleet(two_pods()))
    assert p.actions == ()
    assert p.requeue_after == PlannerConfig().idle_requeue
    st = p.pool_status
    assert (st.replicas, st.ready_replicas, st.updated_replicas) == (2, 2, 2)
    assert st.current_version is None and st.target_version is None
    assert cond(st, "Available") is ConditionStatus.TRUE
    assert cond(st, "Progressing") is ConditionStatus.FALSE


def test_new_pod_gets_its_gate_and_label() -> None:
    fresh = pod("llm-a", "127.0.0.11", gate=None, label="", ready=False)
    p = plan(fleet([fresh], spec=pool_spec(1)))
    (sync,) = of(p, SyncPod)
    assert sync == SyncPod("llm-a", "base", True, "ServingCurrentVersion", "serves base")
    assert p.requeue_after == PlannerConfig().active_requeue


def test_unreachable_agent_leaves_pod_alone() -> None:
    silent = pod("llm-a", "127.0.0.11", gate=True, agent_=None)
    p = plan(fleet([silent], spec=pool_spec(1)))
    assert p.actions == ()


def test_inconsistent_agent_loses_its_gate() -> None:
    a = agent("llm-a", None, ready=False)
    broken = pod("llm-a", "127.0.0.11", gate=True, agent_=a)
    p = plan(fleet([broken], spec=pool_spec(1)))
    (sync,) = of(p, SyncPod)
    assert sync.gate is False and sync.gate_reason == "AgentNotReady"


# ---- a broadcast rollout, step by step -----------------------------------------------------------------


def test_pending_forms_group_and_stages_parts() -> None:
    p = plan(fleet(two_pods(), [wv("v1")]))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.STAGING
    assert cond(st, "Accepted") is ConditionStatus.TRUE
    assert st.start_time == T0 + timedelta(seconds=5)
    assert st.replicas == 2
    assert st.rollout is not None
    assert [(m.pod, m.rank, m.address) for m in st.rollout.members] == [
        ("llm-a", 0, "127.0.0.11"),
        ("llm-b", 1, "127.0.0.12"),
    ]
    stages = of(p, Stage)
    assert [(s.pod, s.endpoint) for s in stages] == [
        ("llm-a", "http://127.0.0.11:8600"),
        ("llm-b", "http://127.0.0.12:8600"),
    ]
    assert [s.request.part for s in stages] == [
        protocol.PartSpec(index=0, count=2),
        protocol.PartSpec(index=1, count=2),
    ]
    assert stages[0].request.source == protocol.Source(path="/ckpt/ckpts/v1")
    assert ("llm-v1", "Accepted") in events(p) and ("llm-v1", "Staging") in events(p)
    assert cond(p.pool_status, "WeightsUpdating") is ConditionStatus.TRUE
    assert p.pool_status.target_version == "v1"


def staging_status(members: Sequence[tuple[str, str]], attempt: int = 1, **kw: Any) -> WeightVersionStatus:
    st = WeightVersionStatus.model_validate(
        {
            "phase": kw.pop("phase", "Staging"),
            "startTime": T0.isoformat(),
            "replicas": len(members),
            "rollout": {
                "attempt": attempt,
                "members": [{"pod": n, "rank": i, "address": ip} for i, (n, ip) in enumerate(members)],
                "masterPort": 29500 + attempt - 1,
                **kw,
            },
        }
    )
    return st.model_copy(
        update={"conditions": set_condition(st.conditions, "Accepted", True, "Valid", "", T0)}
    )


MEMBERS = [("llm-a", "127.0.0.11"), ("llm-b", "127.0.0.12")]


def test_staging_only_asks_pods_that_have_not_staged() -> None:
    pods = [
        pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12"),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]))
    assert [s.pod for s in of(p, Stage)] == ["llm-b"]
    assert p.version_statuses["llm-v1"].message == "staged on 1/2 pod(s)"


def test_all_staged_sends_the_broadcast_to_every_member() -> None:
    pods = [
        pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2), seconds=1.5)]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2), seconds=2.25)]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.UPDATING
    assert cond(st, "Staged") is ConditionStatus.TRUE
    assert st.stage_durations is not None and st.stage_durations.staging == 2.25
    ups = of(p, StartUpdate)
    assert [(u.pod, u.request.rank) for u in ups] == [("llm-a", 0), ("llm-b", 1)]
    group = ups[0].request.group
    assert group is not None and group == ups[1].request.group
    assert (group.master_addr, group.master_port) == ("127.0.0.11", 29500)
    assert [m.part for m in group.members] == [
        protocol.PartSpec(index=0, count=2),
        protocol.PartSpec(index=1, count=2),
    ]
    req = ups[0].request
    assert req.mode is protocol.UpdateMode.BROADCAST
    assert req.memory_budget_bytes == 64 << 20
    assert req.request_policy is RequestPolicy.KEEP
    # the deadline is 10m from the start; 5 s have passed
    assert req.timeout_seconds == pytest.approx(595.0)
    assert ("llm-v1", "Updating") in events(p)


def test_updating_waits_while_updates_run() -> None:
    running = progress("v1", protocol.UpdateStage.TRANSFERRING)
    pods = [
        pod("llm-a", "127.0.0.11", update=running, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", update=running, staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    assert of(p, StartUpdate) == [] and of(p, Stage) == []
    assert p.version_statuses["llm-v1"].message == "updated 0/2 pod(s)"


def test_restarted_operator_resends_the_update_only_where_it_never_arrived() -> None:
    running = progress("v1", protocol.UpdateStage.CONNECTING)
    pods = [
        pod("llm-a", "127.0.0.11", update=running, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    (up,) = of(p, StartUpdate)
    assert up.pod == "llm-b" and up.request.rank == 1
    assert up.request.group is not None and up.request.group.master_port == 29500


def test_group_done_completes_and_moves_the_pool() -> None:
    done = progress(
        "v1",
        protocol.UpdateStage.COMPLETE,
        finished=T0,
        durations={"connect": 0.5, "transfer": 2, "reload": 1},
    )
    pods = two_pods("v1", update=done, label="base", staged_=[staged("v1")])
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.COMPLETE
    assert cond(st, "Applied") is ConditionStatus.TRUE
    assert st.completion_time == T0 + timedelta(seconds=5)
    assert (st.replicas, st.updated_replicas, st.failed_replicas) == (2, 2, 0)
    assert st.stage_durations is not None
    assert (st.stage_durations.transfer, st.stage_durations.reload) == (2.5, 1.0)
    ps = p.pool_status
    assert ps.current_version == "v1" and ps.current_source == SourceRef(path="ckpts/v1")
    assert ps.updated_replicas == 2
    assert [(s.pod, s.version_label, s.gate) for s in of(p, SyncPod)] == [
        ("llm-a", "v1", None),
        ("llm-b", "v1", None),
    ]
    assert ("llm-v1", "Complete") in events(p) and ("llm", "VersionChanged") in events(p)
    assert cond(ps, "WeightsUpdating") is ConditionStatus.FALSE


def test_early_finisher_is_kept_out_of_traffic_until_the_version_is_current() -> None:
    done = progress("v1", protocol.UpdateStage.COMPLETE, finished=T0)
    running = progress("v1", protocol.UpdateStage.RELOADING)
    pods = [
        pod("llm-a", "127.0.0.11", "v1", update=done, label="base", staged_=[staged("v1")]),
        pod("llm-b", "127.0.0.12", update=running, staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    assert p.version_statuses["llm-v1"].phase is Phase.UPDATING
    syncs = {s.pod: s for s in of(p, SyncPod)}
    assert syncs["llm-a"].gate is False and syncs["llm-a"].version_label == "v1"
    assert "llm-b" not in syncs  # still serving the old version while it reloads: keeps its gate


# ---- losing pods, failures, retries --------------------------------------------------------------------


def test_pod_deleted_while_staging_starts_a_new_attempt_without_it() -> None:
    pods = [pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2))])]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))], spec=pool_spec(2)))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.STAGING
    assert st.rollout is not None and st.rollout.attempt == 2
    assert [m.pod for m in st.rollout.members] == ["llm-a"]
    assert st.rollout.master_port == 29501
    (stage,) = of(p, Stage)
    assert stage.pod == "llm-a" and stage.request.part is None  # alone: the whole checkpoint
    assert ("llm-v1", "Retrying") in events(p)


def test_pod_replaced_under_the_same_name_counts_as_lost() -> None:
    pods = [pod("llm-a", "127.0.0.11"), pod("llm-b", "127.0.0.99")]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]))
    st = p.version_statuses["llm-v1"]
    assert st.rollout is not None and st.rollout.attempt == 2
    assert st.message == "attempt 2: staged on 0/2 pod(s)"
    (retry,) = [e for e in of(p, Emit) if e.reason == "Retrying"]
    assert "pod llm-b restarted or moved" in retry.message and retry.warning


def test_member_lost_while_updating_waits_for_the_others_to_abort() -> None:
    running = progress("v1", protocol.UpdateStage.TRANSFERRING)
    pods = [pod("llm-a", "127.0.0.11", update=running, staged_=[staged("v1", (0, 2))])]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.UPDATING and st.message.startswith("waiting for 1 pod(s) to abort")
    assert of(p, StartUpdate) == [] and of(p, Stage) == []


def test_failed_broadcast_retries_with_a_new_group_and_ignores_the_old_result() -> None:
    failed = progress("v1", protocol.UpdateStage.FAILED, uid="old", error="peer vanished", finished=T0)
    pods = [
        pod("llm-a", "127.0.0.11", update=failed, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", update=failed, staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    assert st.rollout is not None and st.rollout.attempt == 2
    assert st.rollout.stale_updates == ["old"]
    # Same two pods; their staged parts still fit the new group, so the update goes out at once.
    assert st.phase is Phase.UPDATING
    assert [u.pod for u in of(p, StartUpdate)] == ["llm-a", "llm-b"]
    assert all(u.request.group and u.request.group.master_port == 29501 for u in of(p, StartUpdate))
    # The next look, with the stale failure still on the agents, does not count it again.
    nxt = plan(fleet(pods, [wv("v1", status=st)]))
    assert nxt.version_statuses.get("llm-v1", st).rollout.attempt == 2  # type: ignore[union-attr]
    assert [u.pod for u in of(nxt, StartUpdate)] == ["llm-a", "llm-b"]


def test_member_whose_agent_restarted_after_staging_ends_the_attempt() -> None:
    running = progress("v1", protocol.UpdateStage.CONNECTING)
    pods = [
        pod("llm-a", "127.0.0.11", update=running, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12"),  # restarted agent: nothing staged, no update
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    assert "pod llm-b no longer holds its staged part of v1" in st.message
    assert of(p, StartUpdate) == []  # llm-a is still running: wait for it to abort first


def test_attempts_exhausted_fails_and_leaves_pods_on_the_old_version() -> None:
    failed = progress("v1", protocol.UpdateStage.FAILED, uid="x", error="boom", finished=T0)
    pods = two_pods(update=failed, staged_=[staged("v1")])
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, attempt=3, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.FAILED
    assert cond(st, "Applied") is ConditionStatus.FALSE
    assert condition(st.conditions, "Applied").reason == "AttemptsExhausted"  # type: ignore[union-attr]
    assert "boom" in st.message and st.failed_replicas == 2
    ps = p.pool_status
    assert ps.current_version is None and ps.target_version is None
    assert cond(ps, "Degraded") is ConditionStatus.TRUE
    assert of(p, SyncPod) == []  # both still serve base and keep their gates
    assert ("llm-v1", "Failed") in events(p)
    assert any(e.warning for e in of(p, Emit) if e.reason == "Failed")


def test_permanently_refused_update_request_fails_at_once() -> None:
    """A StartUpdate the agent refuses with a permanent error (400/403/422) is not retried until the
    timeout: the version fails in the next plan, with the agent's message."""
    err = "http://127.0.0.12:8600: BadRequest (400): rank 1 belongs to pod llm-x, this is pod llm-b"
    fails = [ActionFailure("llm-b", "v1", err, permanent=True, at=T0)]  # an update (no source)
    running = progress("v1", protocol.UpdateStage.CONNECTING)
    pods = [
        pod("llm-a", "127.0.0.11", update=running, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]), failures=fails)
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.FAILED, st.message
    assert condition(st.conditions, "Applied").reason == "UpdateRejected"  # type: ignore[union-attr]
    assert "pod llm-b refused the update to v1" in st.message and "belongs to pod llm-x" in st.message
    assert of(p, StartUpdate) == []  # not sent again
    assert ("llm-v1", "Failed") in events(p)
    # The same failure, transient: backed off and retried, the version keeps Updating.
    soft = [replace(fails[0], permanent=False)]
    later = T0 + timedelta(seconds=5)
    q = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))], now=later), soft)
    assert q.version_statuses["llm-v1"].phase is Phase.UPDATING
    assert [u.pod for u in of(q, StartUpdate)] == ["llm-b"]


@pytest.mark.parametrize("code", [ErrorCode.CHECKPOINT_MISMATCH, ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL])
def test_update_failed_with_a_permanent_code_fails_without_a_new_attempt(code: ErrorCode) -> None:
    failed = progress("v1", protocol.UpdateStage.FAILED, uid="u9", error="shapes differ", finished=T0)
    failed = failed.model_copy(update={"error_code": code})
    pods = [
        pod("llm-a", "127.0.0.11", update=failed, staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS, phase="Updating"))]))
    st = p.version_statuses["llm-v1"]
    if code.permanent:
        assert st.phase is Phase.FAILED and st.rollout is not None and st.rollout.attempt == 1
        assert condition(st.conditions, "Applied").reason == "UpdateRejected"  # type: ignore[union-attr]
        assert f"pod llm-a: shapes differ ({code})" in st.message
    else:  # transient: a new attempt (maxAttempts 3)
        assert st.phase is not Phase.FAILED and st.rollout is not None and st.rollout.attempt == 2


def test_bad_checkpoint_fails_at_once() -> None:
    fails = [ActionFailure("llm-b", "v1", "missing tensor lm_head.weight", permanent=True, at=T0)]
    pods = two_pods()
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]), failures=fails)
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.FAILED
    assert condition(st.conditions, "Staged").reason == "CheckpointInvalid"  # type: ignore[union-attr]
    assert "missing tensor lm_head.weight" in st.message
    assert of(p, StartUpdate) == [] and of(p, Stage) == []
    # the staged part is dropped
    pods = [pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2))]), pods[1]]
    after = plan(fleet(pods, [wv("v1", status=st)]))
    assert of(after, DropStaged) == [DropStaged("llm-a", "http://127.0.0.11:8600", "v1")]


def test_transient_failure_is_retried_not_fatal() -> None:
    fails = [ActionFailure("llm-b", "v1", "connection refused", permanent=False, at=T0)]
    later = T0 + timedelta(seconds=5)  # past the first backoff (1 s)
    p = plan(fleet(two_pods(), [wv("v1", status=staging_status(MEMBERS))], now=later), failures=fails)
    assert p.version_statuses["llm-v1"].phase is Phase.STAGING
    assert [s.pod for s in of(p, Stage)] == ["llm-a", "llm-b"]


SOURCE_V1 = protocol.Source(path="/ckpt/ckpts/v1")


def test_backoff_is_exponential_and_capped() -> None:
    cfg = PlannerConfig(action_backoff_base=1.0, action_backoff_max=60.0)
    assert [backoff_s(n, cfg) for n in (1, 2, 3, 4, 7, 8, 30)] == [1, 2, 4, 8, 60, 60, 60]


@pytest.mark.parametrize(
    ("attempts", "elapsed", "restaged"), [(1, 0.5, False), (1, 1.5, True), (5, 15, False), (5, 17, True)]
)
def test_failed_stage_waits_out_its_backoff_and_shows_the_error(
    attempts: int, elapsed: float, restaged: bool
) -> None:
    err = "http://127.0.0.12:8600: internal (500): OSError: disk on fire"
    fails = [ActionFailure("llm-b", "v1", err, permanent=False, at=T0, attempts=attempts, source=SOURCE_V1)]
    now = T0 + timedelta(seconds=elapsed)
    p = plan(fleet(two_pods(), [wv("v1", status=staging_status(MEMBERS))], now=now), failures=fails)
    assert [s.pod for s in of(p, Stage)] == (["llm-a", "llm-b"] if restaged else ["llm-a"])
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.STAGING
    assert st.message.startswith("staged on 0/2 pod(s); pod llm-b: " + err), st.message
    assert f"{attempts} failed attempt(s)" in st.message
    assert ("retrying in" in st.message) is not restaged
    if not restaged:
        left = backoff_s(attempts, PlannerConfig()) - elapsed
        assert p.requeue_after == pytest.approx(left + DUE_SLACK_S)


@pytest.mark.parametrize(
    ("attempts", "elapsed", "resent"), [(1, 0.5, False), (1, 1.5, True), (4, 7, False), (4, 9, True)]
)
def test_failed_update_request_waits_out_its_backoff_and_shows_the_error(
    attempts: int, elapsed: float, resent: bool
) -> None:
    err = "http://127.0.0.12:8600: internal (500): RuntimeError: engine busy"
    fails = [ActionFailure("llm-b", "v1", err, permanent=False, at=T0, attempts=attempts)]  # an update
    pods = [
        pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2))]),
    ]
    status = staging_status(MEMBERS, phase="Updating")
    now = T0 + timedelta(seconds=elapsed)
    p = plan(fleet(pods, [wv("v1", status=status)], now=now), failures=fails)
    assert [u.pod for u in of(p, StartUpdate)] == (["llm-a", "llm-b"] if resent else ["llm-a"])
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.UPDATING
    assert st.message.startswith("updated 0/2 pod(s); pod llm-b: " + err), st.message
    assert f"{attempts} failed attempt(s)" in st.message
    assert ("retrying in" in st.message) is not resent
    # No event ends a backoff: the plan asks to be looked at again when it ends (a safety net else).
    if resent:
        assert p.requeue_after <= PlannerConfig().active_requeue
    else:
        left = backoff_s(attempts, PlannerConfig()) - elapsed
        assert p.requeue_after == pytest.approx(left + DUE_SLACK_S)


def test_failed_update_request_backs_off_from_the_first_broadcast_too() -> None:
    fails = [
        ActionFailure("llm-b", "v1", "connection refused", permanent=False, at=T0 + timedelta(seconds=5))
    ]
    pods = [
        pod("llm-a", "127.0.0.11", staged_=[staged("v1", (0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[staged("v1", (1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]), failures=fails)
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.UPDATING and [u.pod for u in of(p, StartUpdate)] == ["llm-a"]
    assert "pod llm-b: connection refused (1 failed attempt(s), retrying in 1s)" in st.message


def test_failed_catch_up_update_request_backs_off_and_degrades_the_pool() -> None:
    holder = staged("v1", p2p="10.0.0.1:7000")
    c = pod("llm-c", "127.0.0.13", gate=False, ready=False)
    pods = [*two_pods("v1", staged_=[holder]), c]
    fails = [ActionFailure("llm-c", "v1", "internal (500): boom", permanent=False, at=T0, attempts=3)]
    soon = plan(fleet(pods, [], current="v1", spec=pool_spec(3), now=T0 + timedelta(seconds=3)), fails)
    assert of(soon, StartUpdate) == [] and of(soon, Stage) == []
    degraded = condition(soon.pool_status.conditions, "Degraded")
    assert degraded is not None and degraded.status is ConditionStatus.TRUE
    assert degraded.message == "pod llm-c cannot update to v1: internal (500): boom"
    later = plan(fleet(pods, [], current="v1", spec=pool_spec(3), now=T0 + timedelta(seconds=5)), fails)
    assert [u.pod for u in of(later, StartUpdate)] == ["llm-c"]


def test_failure_of_another_source_does_not_hold_the_stage() -> None:
    other = protocol.Source(path="/ckpt/elsewhere")
    fails = [ActionFailure("llm-b", "v1", "boom", permanent=True, at=T0, source=other)]
    p = plan(fleet(two_pods(), [wv("v1", status=staging_status(MEMBERS))]), failures=fails)
    assert p.version_statuses["llm-v1"].phase is Phase.STAGING
    assert [s.pod for s in of(p, Stage)] == ["llm-a", "llm-b"]


def test_timeout_message_keeps_the_last_error() -> None:
    fails = [ActionFailure("llm-b", "v1", "internal (500): boom", permanent=False, at=T0, source=SOURCE_V1)]
    first = plan(fleet(two_pods(), [wv("v1", status=staging_status(MEMBERS))]), failures=fails)
    st = first.version_statuses["llm-v1"]
    late = T0 + timedelta(minutes=11)
    p = plan(fleet(two_pods(), [wv("v1", status=st)], now=late), failures=fails)
    out = p.version_statuses["llm-v1"]
    assert out.phase is Phase.FAILED
    assert "timed out after 10m in phase Staging" in out.message and "internal (500): boom" in out.message


def test_timeout_fails_the_version() -> None:
    st = staging_status(MEMBERS)
    p = plan(fleet(two_pods(), [wv("v1", status=st, timeout="2m")], now=T0 + timedelta(minutes=3)))
    out = p.version_statuses["llm-v1"]
    assert out.phase is Phase.FAILED and "timed out after 2m in phase Staging" in out.message
    assert condition(out.conditions, "Applied").reason == "Timeout"  # type: ignore[union-attr]


# ---- superseding ---------------------------------------------------------------------------------------


def test_newer_version_supersedes_one_in_progress_and_waits_for_running_updates() -> None:
    running = progress("v1", protocol.UpdateStage.TRANSFERRING)
    pods = two_pods(update=running, staged_=[staged("v1")])
    v1 = wv("v1", status=staging_status(MEMBERS, phase="Updating"))
    v2 = wv("v2", created=T0 + timedelta(seconds=1))
    p = plan(fleet(pods, [v2, v1]))
    assert p.version_statuses["llm-v1"].phase is Phase.SUPERSEDED
    assert condition(p.version_statuses["llm-v1"].conditions, "Applied").reason == "Superseded"  # type: ignore[union-attr]
    st2 = p.version_statuses["llm-v2"]
    assert st2.phase is Phase.PENDING and "waiting for the update in progress" in st2.message
    assert of(p, Stage) == [] and of(p, StartUpdate) == []


def test_superseded_version_that_landed_does_not_cost_an_extra_update() -> None:
    """v1 landed on both pods after it was superseded (it never became current): v2's group forms
    from them as they are — a broadcast replaces every weight, so what they serve does not matter."""
    done = progress("v1", protocol.UpdateStage.COMPLETE, finished=T0)
    pods = two_pods("v1", update=done, staged_=[staged("v1")])
    v1 = wv("v1", status=WeightVersionStatus(phase=Phase.SUPERSEDED))
    v2 = wv("v2", created=T0 + timedelta(seconds=1))
    p = plan(fleet(pods, [v1, v2]))
    st = p.version_statuses["llm-v2"]
    assert st.phase is Phase.STAGING and st.rollout is not None and st.rollout.from_version is None
    assert [(s.pod, s.request.version) for s in of(p, Stage)] == [("llm-a", "v2"), ("llm-b", "v2")]
    # while they serve v1 and the pool serves base, they are out of traffic
    assert {(s.pod, s.gate) for s in of(p, SyncPod)} == {("llm-a", False), ("llm-b", False)}


def test_target_is_newest_by_creation_then_name() -> None:
    a = wv("a", created=T0)
    b = wv("b", created=T0)
    p = plan(fleet(two_pods(), [b, a]))
    assert p.version_statuses["llm-a"].phase is Phase.SUPERSEDED
    assert p.version_statuses["llm-b"].phase is Phase.STAGING


def test_terminal_versions_are_left_alone() -> None:
    v1 = wv("v1", status=WeightVersionStatus(phase=Phase.COMPLETE, sequence=1))
    p = plan(fleet(two_pods("v1"), [v1], current="v1"))
    assert p.version_statuses == {}
    assert p.actions == ()


def test_a_terminal_version_seen_first_is_only_numbered() -> None:
    v1 = wv("v1", status=WeightVersionStatus(phase=Phase.COMPLETE))
    p = plan(fleet(two_pods("v1"), [v1], current="v1"))
    assert p.version_statuses == {"llm-v1": WeightVersionStatus(phase=Phase.COMPLETE, sequence=1)}
    assert p.actions == ()


# ---- catch-up ------------------------------------------------------------------------------------------


def test_scaled_out_pod_stages_the_current_version_from_storage() -> None:
    pods = [*two_pods("v1"), pod("llm-c", "127.0.0.13", gate=None, label="", ready=False)]
    v1 = wv("v1", status=WeightVersionStatus(phase=Phase.COMPLETE))
    p = plan(fleet(pods, [v1], current="v1", spec=pool_spec(3)))
    (stage,) = of(p, Stage)
    assert stage.pod == "llm-c" and stage.request.part is None
    assert stage.request.source.path == "/ckpt/ckpts/v1"
    (sync,) = of(p, SyncPod)
    assert (sync.pod, sync.version_label, sync.gate, sync.gate_reason) == (
        "llm-c",
        "base",
        False,
        "OtherVersion",
    )
    assert cond(p.pool_status, "Progressing") is ConditionStatus.TRUE
    assert p.pool_status.ready_replicas == 2 and p.pool_status.updated_replicas == 2


def test_staged_pod_applies_the_version_alone() -> None:
    pods = [*two_pods("v1"), pod("llm-c", "127.0.0.13", gate=False, staged_=[staged("v1")], ready=False)]
    p = plan(fleet(pods, [], current="v1", spec=pool_spec(3)))
    (up,) = of(p, StartUpdate)
    assert up.pod == "llm-c"
    g = up.request.group
    assert g is not None and g.world_size == 1 and g.master_addr == "127.0.0.13"
    assert up.request.rank == 0 and g.members[0].part is None


def holder(name: str, ip: str, version: str = "v1", **kw: Any) -> PodView:
    """A pod serving `version` and publishing it to peers (Mooncake endpoint on its IP)."""
    return pod(name, ip, version, staged_=[staged(version, p2p=f"{ip}:17001")], **kw)


def test_p2p_catch_up_is_the_default_and_reads_from_the_healthy_holders() -> None:
    transport = {"maxBytesPerSecond": 1 << 20}
    spec = pool_spec(5, engine={"device": "CPU", "port": 8600, "transport": transport})
    busy = progress("v1", protocol.UpdateStage.TRANSFERRING, mode=protocol.UpdateMode.P2P)
    pods = [
        holder("llm-a", "127.0.0.11"),
        holder("llm-b", "127.0.0.12"),
        pod("llm-c", "127.0.0.13", gate=False, ready=False),
        holder("llm-d", "127.0.0.14", deleting=True),  # going away: not a source
        pod("llm-e", "127.0.0.15", gate=False, ready=False, update=busy),  # pulling already
    ]
    assert PlannerConfig().p2p_catch_up
    p = plan(fleet(pods, [], current="v1", spec=spec))
    (up,) = of(p, StartUpdate)
    assert up.pod == "llm-c" and up.endpoint == "http://127.0.0.13:8600"
    req = up.request
    assert req.version == "v1" and req.mode is protocol.UpdateMode.P2P
    assert req.group is None and req.rank is None
    assert [(x.pod, x.source.endpoint) for x in req.peers] == [
        ("llm-a", "127.0.0.11:17001"),
        ("llm-b", "127.0.0.12:17001"),
    ]
    assert req.max_bytes_per_second == 1 << 20  # the pool's transport cap paces catch-up too
    assert of(p, Stage) == []
    # The gate stays False until the pod serves v1.
    assert [(s.pod, s.gate) for s in of(p, SyncPod) if s.gate is not None] == []
    # Disabled: storage.
    off = plan(fleet(pods, [], current="v1", spec=spec), config=PlannerConfig(p2p_catch_up=False))
    assert of(off, StartUpdate) == [] and [s.pod for s in of(off, Stage)] == ["llm-c"]


def test_p2p_without_holders_falls_back_to_storage() -> None:
    pods = [*two_pods("v1"), pod("llm-c", "127.0.0.13", gate=False, ready=False)]  # holders lack p2p
    p = plan(fleet(pods, [], current="v1", spec=pool_spec(3)))
    assert [s.pod for s in of(p, Stage)] == ["llm-c"] and of(p, StartUpdate) == []
    # A holder that is not healthy (its engine is down) is no source either.
    a = holder("llm-a", "127.0.0.11")
    assert a.agent is not None
    down = replace(a, agent=a.agent.model_copy(update={"engine_up": False}))
    p = plan(fleet([down, pods[2]], [], current="v1", spec=pool_spec(2)))
    assert [s.pod for s in of(p, Stage)] == ["llm-c"] and of(p, StartUpdate) == []


def test_failed_p2p_catch_up_stages_from_storage_at_once() -> None:
    """No holder left (NoHolderLeft) or peers unreachable: the next attempt reads the WeightVersion's
    source, without waiting out the backoff and without another p2p attempt in between."""
    holders = [holder("llm-a", "127.0.0.11"), holder("llm-b", "127.0.0.12")]
    failed_p2p = progress(
        "v1", protocol.UpdateStage.FAILED, error="no holder left", finished=T0, mode=protocol.UpdateMode.P2P
    )
    c = pod("llm-c", "127.0.0.13", gate=False, ready=False, update=failed_p2p)
    now = T0 + timedelta(seconds=1)  # well inside the backoff
    p = plan(fleet([*holders, c], [], current="v1", spec=pool_spec(3), now=now))
    assert of(p, StartUpdate) == []
    (stage,) = of(p, Stage)
    assert stage.pod == "llm-c" and stage.request.part is None
    assert stage.request.source.path == "/ckpt/ckpts/v1"  # the current version's source
    # Staged: applied alone (a broadcast group of one), still not p2p.
    c = pod("llm-c", "127.0.0.13", gate=False, ready=False, update=failed_p2p, staged_=[staged("v1")])
    p = plan(fleet([*holders, c], [], current="v1", spec=pool_spec(3), now=now))
    (up,) = of(p, StartUpdate)
    assert up.pod == "llm-c" and up.request.mode is protocol.UpdateMode.BROADCAST
    assert up.request.group is not None and up.request.group.world_size == 1
    # That failed too: the usual backoff, then p2p again (the holders are still there).
    failed_storage = progress("v1", protocol.UpdateStage.FAILED, uid="u2", error="oom", finished=now)
    c = pod("llm-c", "127.0.0.13", gate=False, ready=False, update=failed_storage)
    soon = plan(fleet([*holders, c], [], current="v1", spec=pool_spec(3), now=now + timedelta(seconds=2)))
    assert of(soon, StartUpdate) == [] and of(soon, Stage) == []
    assert cond(soon.pool_status, "Degraded") is ConditionStatus.TRUE
    later = plan(fleet([*holders, c], [], current="v1", spec=pool_spec(3), now=now + timedelta(seconds=30)))
    (up,) = of(later, StartUpdate)
    assert up.request.mode is protocol.UpdateMode.P2P and [x.pod for x in up.request.peers] == [
        "llm-a",
        "llm-b",
    ]


def test_pod_added_during_a_broadcast_catches_up_to_the_target_afterwards() -> None:
    """The group is fixed at Staging (joining would restart the collective rendezvous of every
    member): a pod added meanwhile gets nothing until the rollout is Complete, then reads the
    rollout's target version from the members peer-to-peer."""
    v1_holders = [holder("llm-a", "127.0.0.11"), holder("llm-b", "127.0.0.12")]
    new = pod("llm-c", "127.0.0.13", gate=None, label="", ready=False)
    staging = wv("v2", status=staging_status(MEMBERS, fromVersion="v1"))
    p = plan(fleet([*v1_holders, new], [staging], current="v1", spec=pool_spec(3)))
    assert p.version_statuses["llm-v2"].phase is Phase.STAGING
    assert {s.pod for s in of(p, Stage)} == {"llm-a", "llm-b"}  # the members only
    assert of(p, StartUpdate) == []
    sync = {s.pod: s for s in of(p, SyncPod)}
    assert sync["llm-c"].gate is False
    # Updating: still nothing for llm-c, not even v1 from the holders.
    running = progress("v2", protocol.UpdateStage.TRANSFERRING)
    members = [
        pod(n, ip, "v1", update=running, staged_=[staged("v1", p2p=f"{ip}:17001"), staged("v2", (i, 2))])
        for i, (n, ip) in enumerate(MEMBERS)
    ]
    updating = wv("v2", status=staging_status(MEMBERS, phase="Updating", fromVersion="v1"))
    p = plan(fleet([*members, new], [updating], current="v1", spec=pool_spec(3)))
    assert p.version_statuses.get("llm-v2", updating.status).phase is Phase.UPDATING
    assert [a for a in of(p, Stage) + of(p, StartUpdate) if a.pod == "llm-c"] == []
    # The members finish: the round that completes v2 makes it current and starts llm-c's catch-up.
    done = progress("v2", protocol.UpdateStage.COMPLETE, finished=T0)
    members = [
        pod(n, ip, "v2", update=done, label="v1", staged_=[staged("v2", p2p=f"{ip}:17001")])
        for n, ip in MEMBERS
    ]
    p = plan(fleet([*members, new], [updating], current="v1", spec=pool_spec(3)))
    st = p.version_statuses["llm-v2"]
    assert st.phase is Phase.COMPLETE and p.pool_status.current_version == "v2"
    (up,) = of(p, StartUpdate)  # to the rollout's target v2, not the v1 it was added under
    assert up.pod == "llm-c" and up.request.version == "v2"
    assert up.request.mode is protocol.UpdateMode.P2P
    assert [(x.pod, x.source.version) for x in up.request.peers] == [("llm-a", "v2"), ("llm-b", "v2")]


def test_failed_catch_up_backs_off_then_retries() -> None:
    failed = progress("v1", protocol.UpdateStage.FAILED, error="oom", finished=T0)
    c = pod("llm-c", "127.0.0.13", gate=False, ready=False, update=failed, staged_=[staged("v1")])
    pods = [*two_pods("v1"), c]
    soon = plan(fleet(pods, [], current="v1", spec=pool_spec(3), now=T0 + timedelta(seconds=3)))
    assert of(soon, StartUpdate) == []
    assert cond(soon.pool_status, "Degraded") is ConditionStatus.TRUE
    assert "oom" in condition(soon.pool_status.conditions, "Degraded").message  # type: ignore[union-attr]
    later = plan(fleet(pods, [], current="v1", spec=pool_spec(3), now=T0 + timedelta(seconds=30)))
    assert [u.pod for u in of(later, StartUpdate)] == ["llm-c"]


def test_no_catch_up_while_a_broadcast_runs() -> None:
    running = progress("v2", protocol.UpdateStage.TRANSFERRING)
    members = two_pods("v1", update=running, staged_=[staged("v2")])
    pods = [*members, pod("llm-c", "127.0.0.13", gate=False, ready=False)]
    v2 = wv("v2", status=staging_status(MEMBERS, phase="Updating", fromVersion="v1"))
    p = plan(fleet(pods, [v2], current="v1", spec=pool_spec(3)))
    assert of(p, Stage) == [] and of(p, StartUpdate) == []


# ---- other shapes --------------------------------------------------------------------------------------


def test_pool_scaled_to_zero_completes_a_version_at_once() -> None:
    p = plan(fleet([], [wv("v1")], spec=pool_spec(0)))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.COMPLETE and st.replicas == 0
    assert p.pool_status.current_version == "v1"
    assert cond(p.pool_status, "Available") is ConditionStatus.TRUE


def test_version_waits_for_a_healthy_pod() -> None:
    starting = pod("llm-a", "127.0.0.11", running=False, gate=None, ready=False)
    p = plan(fleet([starting], [wv("v1")], spec=pool_spec(1)))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.PENDING and st.message.startswith("waiting for a healthy pod")
    assert of(p, Stage) == []


def test_p2p_strategy_seeds_one_pod_then_followers_catch_up() -> None:
    pods = two_pods()
    p = plan(fleet(pods, [wv("v1", strategy="P2P")]))
    st = p.version_statuses["llm-v1"]
    assert st.rollout is not None
    assert [m.pod for m in st.rollout.members] == ["llm-a"] and st.rollout.followers == ["llm-b"]
    assert [(s.pod, s.request.part) for s in of(p, Stage)] == [("llm-a", None)]
    # seed done: the follower stages from storage (the seed publishes no p2p source here)
    done = progress("v1", protocol.UpdateStage.COMPLETE, finished=T0)
    pods = [pod("llm-a", "127.0.0.11", "v1", update=done, staged_=[staged("v1")]), pods[1]]
    st.phase = Phase.UPDATING
    p2 = plan(fleet(pods, [wv("v1", strategy="P2P", status=st)]))
    st2 = p2.version_statuses["llm-v1"]
    assert st2.phase is Phase.UPDATING and "1 follower(s) catching up" in st2.message
    assert [s.pod for s in of(p2, Stage)] == ["llm-b"]


def test_a_follower_whose_update_request_failed_backs_off_and_shows_in_the_message() -> None:
    first = plan(fleet(two_pods(), [wv("v1", strategy="P2P")])).version_statuses["llm-v1"]
    done = progress("v1", protocol.UpdateStage.COMPLETE, finished=T0)
    seed = pod("llm-a", "127.0.0.11", "v1", update=done, staged_=[staged("v1", p2p="10.0.0.1:7000")])
    pods = [seed, pod("llm-b", "127.0.0.12")]
    st = first.model_copy(update={"phase": Phase.UPDATING})
    fails = [ActionFailure("llm-b", "v1", "internal (500): boom", permanent=False, at=T0, attempts=2)]
    p = plan(fleet(pods, [wv("v1", strategy="P2P", status=st)], now=T0 + timedelta(seconds=1)), fails)
    assert of(p, StartUpdate) == [] and of(p, Stage) == []
    msg = p.version_statuses["llm-v1"].message
    assert msg == (
        "group updated; 1 follower(s) catching up; "
        "pod llm-b: internal (500): boom (2 failed attempt(s), retrying in 1s)"
    )
    later = plan(fleet(pods, [wv("v1", strategy="P2P", status=st)], now=T0 + timedelta(seconds=2)), fails)
    assert [u.pod for u in of(later, StartUpdate)] == ["llm-b"]


def test_stale_staged_versions_are_dropped_but_not_the_served_one() -> None:
    a = pod("llm-a", "127.0.0.11", "v2", staged_=[staged("v1"), staged("v2"), staged("v0")])
    p = plan(fleet([a], [], current="v2", spec=pool_spec(1)))
    assert sorted(d.version for d in of(p, DropStaged)) == ["v0", "v1"]


def test_condition_transition_time_moves_only_on_change() -> None:
    c1 = set_condition([], "Applied", False, "A", "", T0)
    c2 = set_condition(c1, "Applied", False, "B", "m", T0 + timedelta(seconds=9))
    assert c2[0].last_transition_time == T0 and c2[0].reason == "B"
    c3 = set_condition(c2, "Applied", True, "C", "", T0 + timedelta(seconds=10))
    assert c3[0].last_transition_time == T0 + timedelta(seconds=10)


# ---- a whole rollout against simulated agents (restart included) ---------------------------------------


def _apply(pods: list[PodView], p: Plan, now: datetime) -> list[PodView]:
    """Agents that do what they are asked at once (pure bookkeeping, to drive the planner end to end)."""
    out = []
    for pv in pods:
        a = pv.agent
        assert a is not None
        for act in p.actions:
            if isinstance(act, Stage) and act.pod == pv.name:
                r = act.request
                s = protocol.StagedVersion(
                    version=r.version,
                    source=r.source,
                    part=r.part,
                    complete=r.part is None,
                    bytes=10,
                    tensors=1,
                    stage_seconds=0.1,
                )
                a = a.model_copy(update={"staged": (*a.staged, s)})
            if isinstance(act, StartUpdate) and act.pod == pv.name:
                u = progress(act.request.version, protocol.UpdateStage.COMPLETE, uid=f"u{now}", finished=now)
                a = a.model_copy(update={"update": u, "serving_version": act.request.version})
            if isinstance(act, SyncPod) and act.pod == pv.name:
                if act.version_label is not None:
                    pv = replace(pv, label_version=act.version_label)
                if act.gate is not None:
                    pv = replace(pv, gate=act.gate, ready=act.gate)
        out.append(replace(pv, agent=a))
    return out


def test_rollout_runs_to_completion_and_survives_a_restart_at_every_step() -> None:
    pods = two_pods()
    v = wv("v1")
    status = InferencePoolStatus()
    phases = []
    now = T0
    for _step in range(10):
        now += timedelta(seconds=2)
        f = Fleet(POOL, 1, pool_spec(2), status, tuple(pods), (v,), now)
        p = plan(f)
        # "Restart": planning again from the same snapshot gives the same decisions.
        assert plan(f).actions == p.actions
        if v.name in p.version_statuses:
            v = replace(v, status=p.version_statuses[v.name])
        status = p.pool_status
        phases.append(v.status.phase)
        pods = _apply(pods, p, now)
        if v.status.phase is Phase.COMPLETE:
            break
    assert phases[:3] == [Phase.STAGING, Phase.UPDATING, Phase.COMPLETE]
    assert status.current_version == "v1"
    f = Fleet(POOL, 1, pool_spec(2), status, tuple(pods), (v,), now + timedelta(seconds=2))
    p = plan(f)
    pods = _apply(pods, p, now)
    assert [(x.label_version, x.gate) for x in pods] == [("v1", True), ("v1", True)]
    assert plan(replace(f, pods=tuple(pods))).actions == ()


# ---- a version names one checkpoint ----------------------------------------------------------------


def test_recreated_current_version_with_another_source_is_refused() -> None:
    pods = two_pods("v1", staged_=[staged("v1")])
    again = wv("v1", path="ckpts/v1-retrained", created=T0 + timedelta(minutes=5))
    p = plan(fleet(pods, [again], current="v1", now=T0 + timedelta(minutes=5, seconds=1)))
    st = p.version_statuses["llm-v1"]
    assert st.phase is Phase.FAILED
    assert condition(st.conditions, "Applied").reason == "VersionReused"  # type: ignore[union-attr]
    assert "from source 'ckpts/v1'" in st.message and "'ckpts/v1-retrained'" in st.message
    assert "publish it as a new version" in st.message
    assert of(p, Stage) == [] and of(p, StartUpdate) == []
    assert p.pool_status.current_version == "v1"
    assert cond(p.pool_status, "Degraded") is ConditionStatus.TRUE


def test_leftover_serving_pod_of_another_source_refuses_the_version() -> None:
    # v2's first WeightVersion was deleted mid-rollout after llm-b applied it; pool current is v1.
    old = staged("v2").model_copy(update={"source": protocol.Source(path="/ckpt/old/v2")})
    pods = [pod("llm-a", "127.0.0.11", "v1"), pod("llm-b", "127.0.0.12", "v2", staged_=[old])]
    p = plan(fleet(pods, [wv("v2")], current="v1"))
    st = p.version_statuses["llm-v2"]
    assert st.phase is Phase.FAILED and "pod llm-b serves version v2 from '/ckpt/old/v2'" in st.message


def test_a_staged_copy_from_another_source_is_staged_again() -> None:
    def old(part: tuple[int, int]) -> protocol.StagedVersion:
        return staged("v1", part).model_copy(update={"source": protocol.Source(path="/ckpt/old/v1")})

    pods = [
        pod("llm-a", "127.0.0.11", staged_=[old((0, 2))]),
        pod("llm-b", "127.0.0.12", staged_=[old((1, 2))]),
    ]
    p = plan(fleet(pods, [wv("v1", status=staging_status(MEMBERS))]))
    assert [(s.pod, s.request.source.path) for s in of(p, Stage)] == [
        ("llm-a", "/ckpt/ckpts/v1"),
        ("llm-b", "/ckpt/ckpts/v1"),
    ]
    assert p.version_statuses["llm-v1"].message == "staged on 0/2 pod(s)"


# ---- which version is the newest ---------------------------------------------------------------------


def test_versions_created_in_the_same_second_end_on_the_last_created() -> None:
    # A trainer publishes r1..r12 within one second; the list comes back in name order, and names
    # sort r10 < r9 as strings. The apiserver stored them in creation order (resourceVersion).
    created = [wv(f"r{i}", rv=str(1000 + 7 * i)) for i in range(1, 13)]
    listed = sorted(created, key=lambda v: v.name)
    p = plan(fleet(two_pods(), listed))
    statuses = p.version_statuses
    assert [statuses[f"llm-r{i}"].sequence for i in range(1, 13)] == list(range(1, 13))
    assert list(statuses) == [f"llm-r{i}" for i in range(1, 13)]  # written oldest first
    assert p.pool_status.target_version == "r12"
    assert statuses["llm-r12"].phase is Phase.STAGING
    assert {statuses[f"llm-r{i}"].phase for i in range(1, 12)} == {Phase.SUPERSEDED}


def test_numbered_versions_keep_their_order_when_later_writes_reorder_resource_versions() -> None:
    # r9 got its status written after r10 was created: its resourceVersion is now the larger one.
    r9 = wv("r9", rv="2000", status=WeightVersionStatus(phase=Phase.SUPERSEDED, sequence=1))
    r10 = wv("r10", rv="1500", status=WeightVersionStatus(sequence=2))
    p = plan(fleet(two_pods(), [r10, r9]))
    assert p.pool_status.target_version == "r10"
    assert p.version_statuses["llm-r10"].phase is Phase.STAGING


def test_a_version_seen_for_the_first_time_is_newer_than_every_numbered_one() -> None:
    old = wv("b", rv="900", created=T0, status=WeightVersionStatus(phase=Phase.COMPLETE, sequence=7))
    new = wv("a", rv="10", created=T0)  # smaller resourceVersion and name: still created after "b"
    p = plan(fleet(two_pods("b"), [new, old], current="b"))
    assert p.version_statuses["llm-a"].sequence == 8
    assert p.pool_status.target_version == "a"


def test_without_resource_versions_digit_runs_compare_as_numbers() -> None:
    p = plan(fleet(two_pods(), [wv("step-10"), wv("step-9"), wv("step-100")]))
    seq = {n: st.sequence for n, st in p.version_statuses.items()}
    assert seq == {"llm-step-9": 1, "llm-step-10": 2, "llm-step-100": 3}
    assert p.pool_status.target_version == "step-100"


# ---- a WeightVersion whose pool does not exist -------------------------------------------------------


def test_a_rollout_whose_pool_was_deleted_fails_at_once() -> None:
    for phase in ("Staging", "Updating"):
        v = wv("v1", status=staging_status(MEMBERS, phase=phase))
        st = orphan_status(v, "ml", T0 + timedelta(seconds=3))
        assert st is not None and st.phase is Phase.FAILED
        assert (
            st.message
            == "InferencePool llm does not exist in namespace ml: it was deleted during the rollout"
        )
        assert condition(st.conditions, "Applied").reason == "PoolNotFound"  # type: ignore[union-attr]
        assert st.completion_time == T0 + timedelta(seconds=3)
        assert orphan_status(replace(v, status=st), "ml", T0 + timedelta(seconds=4)) is None  # terminal


def test_a_version_waiting_for_its_pool_fails_at_its_timeout() -> None:
    v = wv("v1", timeout="2m")
    waiting = orphan_status(v, "ml", T0 + timedelta(seconds=1))
    assert waiting is not None and waiting.phase is Phase.PENDING
    assert condition(waiting.conditions, "Accepted").reason == "PoolNotFound"  # type: ignore[union-attr]
    v = replace(v, status=waiting)
    assert orphan_status(v, "ml", T0 + timedelta(seconds=30)) is None  # nothing new to write
    assert deadline(v) == T0 + timedelta(minutes=2)
    late = orphan_status(v, "ml", T0 + timedelta(minutes=2, seconds=1))
    assert late is not None and late.phase is Phase.FAILED and "(waited 2m)" in late.message


def test_an_accepted_version_whose_pool_was_deleted_fails_at_once() -> None:
    accepted = plan(fleet([pod("llm-a", "127.0.0.11", agent_=None)], [wv("v1")])).version_statuses["llm-v1"]
    assert accepted.phase is Phase.PENDING and cond(accepted, "Accepted") is ConditionStatus.TRUE
    st = orphan_status(wv("v1", status=accepted), "ml", T0 + timedelta(seconds=9))
    assert st is not None and st.phase is Phase.FAILED and "deleted" in st.message


# ---- a WeightVersion whose pool's template is invalid ---------------------------------------------------


def test_a_version_of_a_pool_with_an_invalid_template_ends_at_its_timeout() -> None:
    err = "the template has no container named vllm"
    v = wv("v1", timeout="2m")
    waiting = invalid_pool_status(v, POOL, err, T0 + timedelta(seconds=1))
    assert waiting is not None and waiting.phase is Phase.PENDING
    assert waiting.message == f"InferencePool llm has an invalid template: {err}"
    v = replace(v, status=waiting)
    assert invalid_pool_status(v, POOL, err, T0 + timedelta(minutes=2)) is None  # nothing new to write
    late = invalid_pool_status(v, POOL, err, T0 + timedelta(minutes=2, seconds=1))
    assert late is not None and late.phase is Phase.FAILED
    assert (
        late.message
        == f"timed out after 2m in phase Pending: InferencePool llm has an invalid template: {err}"
    )
    assert late.completion_time == T0 + timedelta(minutes=2, seconds=1)
    assert condition(late.conditions, "Applied").reason == "InvalidTemplate"  # type: ignore[union-attr]
    assert condition(late.conditions, "Staged").reason == "InvalidTemplate"  # type: ignore[union-attr]
    assert invalid_pool_status(replace(v, status=late), POOL, err, T0 + timedelta(hours=1)) is None


def test_a_rollout_stuck_on_an_invalid_template_times_out_from_its_start() -> None:
    v = wv("v1", status=staging_status(MEMBERS), timeout="1m", created=T0 - timedelta(hours=1))
    assert invalid_pool_status(v, POOL, "bad", T0 + timedelta(seconds=59)) is not None  # the message only
    st = invalid_pool_status(v, POOL, "bad", T0 + timedelta(seconds=61))
    assert st is not None and st.phase is Phase.FAILED and "in phase Staging" in st.message


def test_invalid_pool_looks_again_at_the_next_deadline() -> None:
    cfg = PlannerConfig(idle_requeue=30.0)
    versions = [wv("v1", timeout="10m"), wv("v2", timeout="20s"), wv("v0", status=done(1), timeout="1s")]
    statuses, requeue = invalid_pool(versions, POOL, "bad", T0 + timedelta(seconds=5), cfg)
    assert sorted(statuses) == ["llm-v1", "llm-v2"]  # a finished one is left alone
    assert all(st.phase is Phase.PENDING for st in statuses.values())
    assert requeue == pytest.approx(15.5)  # just past v2's deadline
    statuses, requeue = invalid_pool(versions, POOL, "bad", T0 + timedelta(seconds=21), cfg)
    assert statuses["llm-v2"].phase is Phase.FAILED and statuses["llm-v1"].phase is Phase.PENDING
    assert requeue == 30.0


# ---- version history (spec.versionHistoryLimit) --------------------------------------------------------


def done(seq: int, phase: str = "Complete") -> WeightVersionStatus:
    return WeightVersionStatus.model_validate({"sequence": seq, "phase": phase})


def history(*phases: str) -> list[VersionView]:
    """v1, v2, ... numbered 1, 2, ... with these phases; created in reverse (the sequence decides)."""
    return [
        wv(f"v{i}", created=T0 - timedelta(seconds=i), rv=str(100 - i), status=done(i, ph))
        for i, ph in enumerate(phases, start=1)
    ]


def names(vs: Sequence[VersionView]) -> list[str]:
    return [v.spec.version for v in vs]


def test_history_prunes_the_oldest_finished_versions_beyond_the_limit() -> None:
    vs = history("Complete", "Failed", "Superseded", "Complete", "Complete")
    assert names(prune_versions(vs, {"v5"}, 2)) == ["v1", "v2"]  # kept: v3, v4 and the current v5
    assert names(prune_versions(vs, {"v5"}, 4)) == []
    assert names(prune_versions(vs, {"v5"}, 10)) == []
    assert names(prune_versions(vs, {"v5"}, 0)) == ["v1", "v2", "v3", "v4"]
    assert names(prune_versions(list(reversed(vs)), {"v5"}, 2)) == ["v1", "v2"]  # order: sequence only


def test_history_never_prunes_the_current_version_nor_one_in_progress_nor_the_newest() -> None:
    # The pool serves v2 (a rollback made it current again, say); v6 is rolling out; v5 failed.
    vs = history("Complete", "Complete", "Complete", "Superseded", "Failed", "Staging")
    assert names(prune_versions(vs, {"v2"}, 0)) == ["v1", "v3", "v4", "v5"]
    # The newest failed: it stays (it is the pool's target; its status says why it failed).
    vs = history("Complete", "Complete", "Failed")
    assert names(prune_versions(vs, {"v2"}, 0)) == ["v1"]
    # Nothing numbered yet: the unnumbered come after the numbered and are in progress anyway.
    assert names(prune_versions([*history("Complete", "Complete"), wv("v9")], {"v2"}, 0)) == ["v1"]
    assert prune_versions([], {None}, 0) == ()


def pruning(p: Plan) -> PruneVersions | None:
    return next((a for a in p.actions if isinstance(a, PruneVersions)), None)


def test_plan_prunes_beyond_the_pool_limit_and_pods_drop_what_they_hold_of_it() -> None:
    vs = history("Complete", "Complete", "Complete", "Complete")
    # llm-a still holds v1 staged (an older operator kept it): the pruned version's memory goes too.
    pods = [
        pod("llm-a", "127.0.0.11", "v4", staged_=[staged("v4"), staged("v1")]),
        pod("llm-b", "127.0.0.12", "v4"),
    ]
    p = plan(fleet(pods, vs, spec=pool_spec(2, versionHistoryLimit=1), current="v4"))
    pr = pruning(p)
    assert pr is not None and pr.limit == 1
    assert [(v.name, v.version) for v in pr.versions] == [("llm-v1", "v1"), ("llm-v2", "v2")]
    assert DropStaged("llm-a", "http://127.0.0.11:8600", "v1") in p.actions
    # The default keeps 10: nothing to prune here; the next plan over the pruned fleet prunes nothing.
    assert pool_spec(2).version_history_limit == 10
    assert pruning(plan(fleet(two_pods("v4"), vs, current="v4"))) is None
    assert (
        pruning(plan(fleet(two_pods("v4"), vs[2:], spec=pool_spec(2, versionHistoryLimit=1), current="v4")))
        is None
    )


def test_plan_keeps_the_target_in_progress_and_prunes_a_superseded_one_only_once_written() -> None:
    vs = history("Complete", "Complete", "Pending", "Pending")  # v3 will be superseded by v4
    p = plan(
        fleet(
            [pod("llm-a", "127.0.0.11", "v2", agent_=None)],
            vs,
            spec=pool_spec(1, versionHistoryLimit=0),
            current="v2",
        )
    )
    assert p.version_statuses["llm-v3"].phase is Phase.SUPERSEDED
    pr = pruning(p)
    assert pr is not None and [v.version for v in pr.versions] == ["v1"]  # not v3 yet, never v2 nor v4
    vs[2] = replace(vs[2], status=p.version_statuses["llm-v3"])
    pr = pruning(
        plan(
            fleet(
                [pod("llm-a", "127.0.0.11", "v2", agent_=None)],
                vs[1:],
                spec=pool_spec(1, versionHistoryLimit=0),
                current="v2",
            )
        )
    )
    assert pr is not None and [v.version for v in pr.versions] == ["v3"]


def test_a_trainer_sourced_version_is_staged_from_the_trainer_as_the_crd_names_it() -> None:
    tensors = (protocol.TrainerTensor(name="w", dtype="F32", shape=(2,), fingerprint="float32:2:01"),)
    source = protocol.TrainerSource(
        parts=(p2p_source("v1", "127.0.0.1:15000"),),
        tensors=tensors,
        checksum=protocol.trainer_checksum(tensors),
    )
    version = wv("v1")
    spec = version.spec.model_copy(
        update={"source": SourceRef.model_validate({"trainer": source.model_dump()})}
    )
    p = plan(fleet(two_pods(), [replace(version, spec=spec)]))
    stages = of(p, Stage)
    assert [s.request.part for s in stages] == [
        protocol.PartSpec(index=0, count=2),
        protocol.PartSpec(index=1, count=2),
    ]
    assert all(s.request.source == protocol.Source(trainer=source) for s in stages)
