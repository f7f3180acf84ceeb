"""The trainer source on the wire and in the CRD, the operator passing it on, and the SDK's retention."""

from __future__ import annotations

from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_api.resources import SourceRef, WeightVersionSpec
from hotswap_trainer.retention import releasable
from pydantic import ValidationError


def _tensors() -> tuple[protocol.TrainerTensor, ...]:
    return (
        protocol.TrainerTensor(name="a.weight", dtype="BF16", shape=(4, 2), fingerprint="bfloat16:4x2:00ff"),
        protocol.TrainerTensor(name="b", dtype="F32", shape=(), fingerprint="float32::0a"),
    )


def trainer_source() -> protocol.TrainerSource:
    part = protocol.P2PSource(
        endpoint="127.0.0.1:15000",
        version="v1",
        buffers=(protocol.P2PBuffer(segment=0, address=4096, nbytes=512),),
        layout_address=8192,
        layout_nbytes=100,
        layout_sha256="0" * 64,
    )
    tensors = _tensors()
    return protocol.TrainerSource(parts=(part,), tensors=tensors, checksum=protocol.trainer_checksum(tensors))


def test_a_source_names_exactly_one_kind() -> None:
    trainer = trainer_source()
    assert protocol.Source(trainer=trainer).describe() == "trainer 127.0.0.1:15000"
    with pytest.raises(ValidationError, match="exactly one of `path` and `trainer`"):
        protocol.Source()
    with pytest.raises(ValidationError, match="exactly one of `path` and `trainer`"):
        protocol.Source(path="/ckpt/v1", trainer=trainer)
    with pytest.raises(ValidationError, match="applies to a `path` source only"):
        protocol.Source(trainer=trainer, sha256_manifest="m.json")


def test_the_checksum_covers_the_manifest() -> None:
    good = trainer_source()
    changed = tuple(t.model_copy(update={"fingerprint": "x"}) if t.name == "b" else t for t in good.tensors)
    assert protocol.trainer_checksum(changed) != good.checksum
    with pytest.raises(ValidationError, match="checksum does not match the manifest"):
        protocol.TrainerSource(parts=good.parts, tensors=changed, checksum=good.checksum)
    # order does not matter: the checksum is over the manifest by name
    assert protocol.trainer_checksum(tuple(reversed(good.tensors))) == good.checksum


def test_crd_source_round_trips_to_the_stage_request() -> None:
    wire = trainer_source()
    ref = SourceRef.model_validate({"trainer": wire.model_dump()})
    body: dict[str, Any] = ref.to_api()
    assert set(body["trainer"]["parts"][0]) >= {"endpoint", "layoutAddress", "layoutSha256", "buffers"}
    spec = WeightVersionSpec.model_validate({"poolRef": {"name": "llm"}, "version": "v1", "source": body})
    assert spec.source.trainer is not None
    assert protocol.TrainerSource.model_validate(spec.source.trainer.model_dump()) == wire


@pytest.mark.parametrize(
    ("held", "phases", "need_room", "cap", "release"),
    [
        # kept until a newer version is Complete
        (["v1", "v2"], {"v1": "Complete", "v2": "Updating"}, False, 2, []),
        (["v1", "v2"], {"v1": "Complete", "v2": "Complete"}, False, 2, ["v1"]),
        (["v1", "v2", "v3"], {"v1": "Staging", "v2": "Complete", "v3": "Pending"}, False, 3, ["v1"]),
        # failed, superseded or deleted: nobody reads them any more
        (["v1", "v2"], {"v1": "Failed", "v2": None}, False, 2, ["v1", "v2"]),
        (["v1", "v2"], {"v1": "Superseded", "v2": "Staging"}, False, 2, ["v1"]),
        # an unreadable phase keeps the version
        (["v1", "v2"], {"v2": "Complete"}, False, 2, []),
        # at the cap, the oldest Complete one makes room; one still rolling out never does
        (["v1", "v2"], {"v1": "Complete", "v2": "Updating"}, True, 2, ["v1"]),
        (["v1", "v2"], {"v1": "Staging", "v2": "Updating"}, True, 2, []),
        (["v1"], {"v1": "Complete"}, True, 2, []),
    ],
)
def test_retention(
    held: list[str], phases: dict[str, str | None], need_room: bool, cap: int, release: list[str]
) -> None:
    assert releasable(held, phases, need_room=need_room, cap=cap) == release
