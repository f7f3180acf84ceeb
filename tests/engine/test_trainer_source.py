"""Publishing from a trainer's memory (hotswap_trainer) and staging from it (transport.trainer_source),
over real Mooncake TCP on loopback.

In-process trainer ranks (`TrainerMemory`) where the trainer only has to hold memory; a spawned
trainer process where it has to die mid-read (SIGKILL). Messages to that process are JSON bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
from hotswap_api import protocol
from hotswap_engine import buckets
from hotswap_engine.hostmem import HostBufferPool
from hotswap_engine.staging import CheckpointMismatch, ManifestMismatch, tensor_nbytes
from hotswap_engine.transport.p2p import P2PEndpoint
from hotswap_engine.transport.trainer_source import TrainerUnavailable, stage_from_trainer
from hotswap_trainer.memory import PartDescriptor, PublishError, TrainerMemory

HOST = "127.0.0.1"


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = {"embed.weight": torch.randn(512, 64, generator=g).to(torch.bfloat16)}
    for layer in range(3):
        model[f"layers.{layer}.mlp.weight"] = torch.randn(128, 256, generator=g)
        model[f"layers.{layer}.norm.weight"] = torch.randn(77, generator=g).to(torch.bfloat16)
        model[f"layers.{layer}.bias"] = torch.randint(-5, 5, (3,), generator=g)
    return model


def _expected(model: dict[str, torch.Tensor]) -> list[protocol.TensorSpec]:
    from hotswap_trainer.memory import DTYPE_NAMES

    return [
        protocol.TensorSpec(name=n, dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape))
        for n, t in model.items()
    ]


def _source(*parts: PartDescriptor) -> protocol.TrainerSource:
    tensors = tuple(sorted((t for d in parts for t in d.tensors), key=lambda t: t.name))
    return protocol.TrainerSource(
        parts=tuple(d.part for d in parts), tensors=tensors, checksum=protocol.trainer_checksum(tensors)
    )


@pytest.fixture(scope="module")
def reader() -> Iterator[P2PEndpoint]:
    with P2PEndpoint(HOST, protocol="tcp") as endpoint:
        yield endpoint


@pytest.fixture
def ranks() -> Iterator[list[TrainerMemory]]:
    mems = [TrainerMemory(HOST, pinned=False), TrainerMemory(HOST, pinned=False)]
    yield mems
    for m in mems:
        m.close()


def test_two_ranks_publish_and_each_part_stages_byte_exact(
    reader: P2PEndpoint, ranks: list[TrainerMemory]
) -> None:
    model = _model()
    names = sorted(model)
    # FSDP-style: each rank holds a disjoint, interleaved share of the tensors
    shares = [[(n, model[n]) for n in names[i::2]] for i in range(2)]
    source = _source(*(mem.hold("v1", share) for mem, share in zip(ranks, shares, strict=True)))
    assert [p.endpoint.startswith(f"{HOST}:") for p in source.parts] == [True, True]
    pool = HostBufferPool(pinned=False)
    staged_parts = {}
    for part in (None, protocol.PartSpec(index=0, count=2), protocol.PartSpec(index=1, count=2)):
        staged = stage_from_trainer(reader, source, part, _expected(model), pool=pool)
        for name, view in staged.iter_views():
            assert torch.equal(view, model[name]), name
        staged_parts[part.index if part else None] = staged
    # the parts split the model as staging from files would (the broadcast relies on that layout)
    sizes = [(n, tensor_nbytes(s.dtype, s.shape)) for n, s in ((s.name, s) for s in _expected(model))]
    assignment = buckets.assign_parts(sorted(sizes), 2)
    for index in (0, 1):
        assert set(staged_parts[index].tensors) == {n for n, p in assignment.items() if p == index}
        assert staged_parts[index].assignment == assignment
    assert staged_parts[None].complete


def test_a_manifest_that_does_not_fit_the_model_is_refused_before_contacting_the_trainer(
    reader: P2PEndpoint, ranks: list[TrainerMemory]
) -> None:
    model = _model()
    source = _source(ranks[0].hold("v1", model.items()))
    # the trainer's address is one nobody listens on: a check after contact would fail differently
    dead = source.parts[0].model_copy(update={"endpoint": f"{HOST}:1"})
    source = source.model_copy(update={"parts": (dead,)})
    served = _expected(model)
    served[0] = served[0].model_copy(update={"shape": (512, 65)})
    with pytest.raises(
        CheckpointMismatch, match=r"mismatched tensors: embed.weight \(expected BF16\[512, 65\]"
    ):
        stage_from_trainer(reader, source, None, served)
    with pytest.raises(CheckpointMismatch, match=r"missing tensors: extra\.weight"):
        stage_from_trainer(
            reader,
            source,
            None,
            [*_expected(model), protocol.TensorSpec(name="extra.weight", dtype="F32", shape=(1,))],
        )
    # and with a fitting manifest the same source fails on contact, so the refusals above came first
    with pytest.raises(TrainerUnavailable):
        stage_from_trainer(reader, source, None, _expected(model), timeout_s=5)


def test_a_rank_table_that_disagrees_with_the_manifest_is_refused_before_any_tensor_byte(
    reader: P2PEndpoint, ranks: list[TrainerMemory]
) -> None:
    model = _model()
    held = ranks[0].hold("v1", model.items())
    # a manifest claiming another shape for one tensor (checksum recomputed, so only the table differs)
    tensors = tuple(
        t.model_copy(update={"shape": (64, 512)}) if t.name == "embed.weight" else t for t in held.tensors
    )
    source = protocol.TrainerSource(
        parts=(held.part,), tensors=tensors, checksum=protocol.trainer_checksum(tensors)
    )
    pool = HostBufferPool(pinned=False)
    with pytest.raises(ManifestMismatch, match=r"'embed.weight' is BF16\[512, 64\] there, BF16\[64, 512\]"):
        stage_from_trainer(reader, source, None, None, pool=pool)
    assert pool.idle_bytes == 0  # no destination buffer was ever taken


def test_bytes_that_do_not_match_their_fingerprints_are_refused(
    reader: P2PEndpoint, ranks: list[TrainerMemory]
) -> None:
    model = _model()
    source = _source(ranks[0].hold("v1", model.items()))
    ranks[0]._held["v1"].slot.tensor[:16].fill_(0x5A)  # the trainer overwrote the version's memory
    with pytest.raises(CheckpointMismatch, match=r"do not match their fingerprints: embed.weight"):
        stage_from_trainer(reader, source, None, _expected(model))


def test_memory_is_reused_across_versions_and_capped() -> None:
    mem = TrainerMemory(HOST, pinned=False, max_slots=2)
    try:
        model = _model()
        mem.hold("v1", model.items())
        mem.hold("v2", _model(1).items())
        with pytest.raises(PublishError, match="holds 2 version"):
            mem.hold("v3", model.items())
        mem.release("v1")
        mem.hold("v3", _model(2).items())
        mem.release("v2")
        mem.hold("v4", _model(3).items())
        assert mem.allocations == 2  # four versions, two buffers: registered and pinned once each
        assert mem.versions == ("v3", "v4")
        with pytest.raises(PublishError, match="already held"):
            mem.hold("v4", model.items())
    finally:
        mem.close()


# ---- a trainer that dies mid-read -------------------------------------------------------------------


def _trainer_main(conn: Connection) -> None:
    mem = TrainerMemory(HOST, pinned=False)
    g = torch.Generator().manual_seed(7)
    model = {f"w{i}": torch.randint(0, 255, (4 << 20,), dtype=torch.uint8, generator=g) for i in range(8)}
    held = mem.hold("v1", model.items())
    conn.send_bytes(held.encode())
    conn.recv_bytes()  # serves reads until told to exit (or killed)
    mem.close()


def test_a_trainer_killed_mid_read_fails_the_stage_with_a_message_saying_so(reader: P2PEndpoint) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_trainer_main, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(120), "the trainer process did not start"
        held = PartDescriptor.decode(parent.recv_bytes())
        source = _source(held)
        expected = [protocol.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in held.tensors]
        seen: list[int] = []

        def kill_after_first_read(done: int, total: int) -> None:
            seen.append(done)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)

        pool = HostBufferPool(pinned=False)
        with pytest.raises(
            TrainerUnavailable, match=r"trainer part 0 \(127\.0\.0\.1:\d+\) went away mid-read"
        ):
            stage_from_trainer(
                reader, source, None, expected, pool=pool, chunk_bytes=1 << 20, progress=kill_after_first_read
            )
        assert not proc.is_alive()
        assert 0 < seen[-1] < 32 << 20  # it died part way
        assert pool.idle_bytes > 0  # the destination went back to the pool, nothing kept
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)


def test_the_sdk_without_cluster_credentials_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotswap_trainer import Publisher

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path) + "/missing")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PublishError, match="no cluster credentials"):
        Publisher("chat", "default", local_hostname=HOST)
    with pytest.raises(PublishError, match="no cluster credentials"):
        Publisher("chat", "default", local_hostname=HOST, kubeconfig=str(tmp_path) + "/also-missing")
