"""The pydantic models of the custom resources: parsing what the apiserver stores, writing status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_api.policy import RequestPolicy
from hotswap_api.resources import (
    PATH_PATTERN,
    InferencePool,
    InferencePoolStatus,
    P2PProtocol,
    Phase,
    SourceRef,
    Strategy,
    WeightVersion,
    WeightVersionStatus,
    parse_duration,
    parse_quantity,
    weight_version_name,
)
from pydantic import ValidationError

POOL: dict[str, Any] = {
    "apiVersion": "hotswap.dev/v1alpha1",
    "kind": "InferencePool",
    "metadata": {"name": "chat", "namespace": "ml"},
    "spec": {
        "template": {
            "spec": {"containers": [{"name": "vllm", "image": "img", "resources": {"limits": {"cpu": 2}}}]}
        },
        "model": {"path": "base"},
        "checkpointVolume": {"source": {"persistentVolumeClaim": {"claimName": "ckpts"}}},
    },
}


def test_pool_defaults() -> None:
    pool = InferencePool.model_validate(POOL)
    s = pool.spec
    assert s.replicas == 1 and s.model.tensor_parallel_size == 1
    assert s.checkpoint_volume.mount_path == "/checkpoints"
    assert s.engine.port == 8600 and s.engine.update_memory_budget == "2Gi"
    assert s.engine.transport.p2p_protocol is P2PProtocol.TCP and s.engine.transport.master_port == 29500
    assert s.update_policy.requests is RequestPolicy.KEEP and s.update_policy.max_attempts == 3
    # unknown container fields are kept for the Deployment
    dumped = s.template.model_dump(by_alias=True)
    assert dumped["spec"]["containers"][0]["resources"] == {"limits": {"cpu": 2}}


def test_pool_wire_names_are_camel_case() -> None:
    raw = dict(
        POOL, spec=dict(POOL["spec"], engine={"transport": {"p2pProtocol": "RDMA", "masterPort": 30000}})
    )
    pool = InferencePool.model_validate(raw)
    assert pool.spec.engine.transport.p2p_protocol is P2PProtocol.RDMA
    assert pool.spec.engine.transport.master_port == 30000
    st = InferencePoolStatus(ready_replicas=1, current_version="v1", selector="hotswap.dev/pool=chat")
    assert st.to_api() == {
        "replicas": 0,
        "readyReplicas": 1,
        "updatedReplicas": 0,
        "currentVersion": "v1",
        "selector": "hotswap.dev/pool=chat",
        "conditions": [],
    }


@pytest.mark.parametrize(
    "broken",
    [
        {"template": {"spec": {"containers": []}}},
        {"replicas": -1},
        {"engine": {"updateMemoryBudget": "2.5Gi"}},
        {"checkpointVolume": {"source": {}, "mountPath": "relative"}},
    ],
)
def test_pool_rejects_what_the_schema_rejects(broken: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        InferencePool.model_validate(dict(POOL, spec=dict(POOL["spec"], **broken)))


WV: dict[str, Any] = {
    "metadata": {"name": "chat-v2"},
    "spec": {"poolRef": {"name": "chat"}, "version": "v2", "source": {"path": "ckpts/v2"}},
}


def test_weight_version_defaults_and_status_round_trip() -> None:
    wv = WeightVersion.model_validate(WV)
    assert wv.spec.strategy is Strategy.BROADCAST and parse_duration(wv.spec.timeout) == 600
    assert wv.status.phase is Phase.PENDING
    t = datetime(2026, 11, 30, tzinfo=UTC)
    st = WeightVersionStatus(phase=Phase.COMPLETE, start_time=t, replicas=2, updated_replicas=2)
    api = st.to_api()
    assert api["startTime"] == "2026-11-30T00:00:00Z" and api["updatedReplicas"] == 2
    assert WeightVersionStatus.model_validate(api) == st
    assert weight_version_name("chat", "v2") == "chat-v2"


@pytest.mark.parametrize("version", ["V2", "v2_", "-v2", "a" * 64, ""])
def test_version_must_be_a_name_part_and_a_label_value(version: str) -> None:
    with pytest.raises(ValidationError):
        WeightVersion.model_validate(dict(WV, spec=dict(WV["spec"], version=version)))


def test_phases_know_which_are_terminal() -> None:
    assert {p for p in Phase if p.terminal} == {Phase.COMPLETE, Phase.FAILED, Phase.SUPERSEDED}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "-1s", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "n"), [("2Gi", 2 << 30), ("512Mi", 512 << 20), ("1000", 1000), ("3G", 3 * 10**9), ("1Ki", 1024)]
)
def test_parse_quantity(text: str, n: int) -> None:
    assert parse_quantity(text) == n


def test_parse_quantity_rejects_fractions() -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity("1.5Gi")


@pytest.mark.parametrize("path", ["ckpts/v1\x00", "ckpts/\nv1", "ckpts/v1\t", "ckpts/\x7fv1"])
def test_paths_with_control_characters_are_refused(path: str) -> None:
    with pytest.raises(ValidationError, match="should match pattern"):
        SourceRef(path=path)
    with pytest.raises(ValidationError, match="should match pattern"):
        SourceRef(path="ckpts/v1", sha256_manifest=path)
    with pytest.raises(ValidationError, match="should match pattern"):
        protocol.Source(path=path)
    assert SourceRef(path="ckpts/step 1/ü").path == "ckpts/step 1/ü"


def test_the_crds_and_the_agent_share_one_path_pattern() -> None:
    assert PATH_PATTERN == protocol.PATH_PATTERN
