"""Fleet verification, the operator's half: a pod whose weights failed verification is kept out of
traffic, the WeightVersion names pod and tensors, and an Event says so once."""

from __future__ import annotations

from typing import Any

from hotswap_api import protocol
from hotswap_api.resources import (
    ConditionStatus,
    Phase,
    PodVerification,
    VerificationLevel,
    WeightVersionStatus,
)
from hotswap_operator.planner import Emit, Plan, SyncPod, plan
from test_operator_planner import agent, cond, fleet, of, pod, wv

TENSOR = "model.layers.0.mlp.down_proj.weight"


def check(digest: str = "d1", received_ok: bool = True, **processed: str) -> protocol.WeightsCheck:
    mismatches = () if received_ok else (protocol.TensorMismatch(tensor=TENSOR, rank=0, detail="rank 0"),)
    return protocol.WeightsCheck(
        version="v1",
        received_ok=received_ok,
        received_mismatches=mismatches,
        received_count=len(mismatches),
        processed_digest=digest,
        processed={"tp0:a": "11", "tp0:b": "22", **processed},
    )


def checked_pod(name: str, ip: str, c: protocol.WeightsCheck, **kw: Any) -> Any:
    a = agent(name, "v1", ready=c.received_ok).model_copy(update={"weights_check": c})
    return pod(name, ip, "v1", agent_=a, **kw)


def complete() -> Any:
    return wv("v1", status=WeightVersionStatus(phase=Phase.COMPLETE, sequence=1))


def gates(p: Plan) -> dict[str, SyncPod]:
    return {s.pod: s for s in of(p, SyncPod) if s.gate is not None}


def verification_events(p: Plan) -> list[Emit]:
    return [e for e in of(p, Emit) if e.reason == "VerificationFailed"]


def test_a_pod_that_received_other_bytes_is_kept_out_and_named_once() -> None:
    pods = [
        checked_pod("llm-a", "127.0.0.11", check()),
        checked_pod("llm-b", "127.0.0.12", check(received_ok=False)),
    ]
    p = plan(fleet(pods, [complete()], current="v1"))
    assert list(gates(p)) == ["llm-b"]
    sync = gates(p)["llm-b"]
    assert sync.gate is False and sync.gate_reason == "VerificationFailed" and TENSOR in sync.gate_message
    (entry,) = p.version_statuses["llm-v1"].verification
    assert (entry.pod, entry.level, entry.tensors) == ("llm-b", VerificationLevel.RECEIVED, [TENSOR])
    (event,) = verification_events(p)
    assert event.warning and "llm-b" in event.message and TENSOR in event.message
    # The next plan sees the status it wrote: nothing more to write, no second Event.
    again = plan(fleet(pods, [wv("v1", status=p.version_statuses["llm-v1"])], current="v1"))
    assert "llm-v1" not in again.version_statuses and verification_events(again) == []


def test_the_odd_pod_of_the_processed_checksums_is_kept_out_with_its_tensor() -> None:
    pods = [
        checked_pod("llm-a", "127.0.0.11", check("d1")),
        checked_pod("llm-b", "127.0.0.12", check("d1")),
        checked_pod("llm-c", "127.0.0.13", check("d2", **{"tp0:b": "99"})),
    ]
    p = plan(fleet(pods, [complete()], current="v1"))
    assert list(gates(p)) == ["llm-c"] and gates(p)["llm-c"].gate_reason == "VerificationFailed"
    assert p.version_statuses["llm-v1"].verification == [
        PodVerification(
            pod="llm-c",
            version="v1",
            level=VerificationLevel.PROCESSED,
            tensors=["tp0:b"],
            message=verification_events(p)[0].message,
        )
    ]
    assert "2 of the 3 pods" in verification_events(p)[0].message


def test_a_disagreement_without_majority_is_reported_not_gated() -> None:
    pods = [checked_pod("llm-a", "127.0.0.11", check("d1")), checked_pod("llm-b", "127.0.0.12", check("d2"))]
    p = plan(fleet(pods, [complete()], current="v1"))
    assert gates(p) == {} and "llm-v1" not in p.version_statuses
    assert cond(p.pool_status, "Degraded") is ConditionStatus.TRUE
    degraded = next(c for c in p.pool_status.conditions if c.type == "Degraded")
    assert degraded.reason == "WeightsDisagree" and "no majority" in degraded.message, degraded


def test_a_pod_that_passes_again_is_taken_off_the_list() -> None:
    bad = PodVerification(pod="llm-b", version="v1", level=VerificationLevel.RECEIVED, tensors=[TENSOR])
    listed = wv("v1", status=WeightVersionStatus(phase=Phase.COMPLETE, sequence=1, verification=[bad]))
    pods = [
        checked_pod(n, ip, check(), gate=n == "llm-a")
        for n, ip in (("llm-a", "127.0.30.1"), ("llm-b", "127.0.30.2"))
    ]
    p = plan(fleet(pods, [listed], current="v1"))
    assert p.version_statuses["llm-v1"].verification == []
    assert gates(p)["llm-b"].gate is True and verification_events(p) == []


def test_a_gate_already_false_for_another_reason_gets_the_verification_reason() -> None:
    """A pod that lagged behind (gate False, OtherVersion) and then failed verification."""
    from dataclasses import replace

    pods = [
        checked_pod("llm-a", "127.0.0.11", check()),
        replace(
            checked_pod("llm-b", "127.0.0.12", check(received_ok=False), gate=False),
            gate_reason="OtherVersion",
        ),
    ]
    p = plan(fleet(pods, [complete()], current="v1"))
    sync = gates(p)["llm-b"]
    assert sync.gate is False and sync.gate_reason == "VerificationFailed"
    settled = [pods[0], replace(pods[1], gate_reason="VerificationFailed")]
    assert "llm-b" not in gates(plan(fleet(settled, [complete()], current="v1")))
