"""Staging a version straight from the trainer's memory (`protocol.TrainerSource`).

Each trainer rank registers its part with its Mooncake engine the way a holder publishes a staged
version (`transport.p2p`): buffers plus a tensor table in registered memory, checked against its
sha256. So an agent stages its part of such a version with the peer-to-peer reader's building
blocks: the trainer ranks become planning `Holder`s, `p2p_plan.plan_reads` spreads the reads over
them, and `P2PEndpoint.pull` runs them, several at once. The result is a `StagedCheckpoint` laid out
exactly as staging from files lays it out, so the broadcast that follows cannot tell the difference.

Order matters, as in `staging.stage`: the manifest is checked against the served model (names,
dtypes, shapes) before any trainer is contacted; each rank's table is checked against the manifest
before any tensor byte is read; and every tensor read is checked against its fingerprint before the
staged copy is handed on, so nothing unverified ever reaches a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from hotswap_api import protocol

from hotswap_engine import buckets, digest
from hotswap_engine.hostmem import HostBuffer, HostBufferPool
from hotswap_engine.p2p_plan import (
    DEFAULT_CHUNK_BYTES,
    Holder,
    NoHolderLeft,
    TensorEntry,
    VersionLayout,
    plan_reads,
)
from hotswap_engine.staging import (
    CheckpointMismatch,
    ManifestMismatch,
    StagedCheckpoint,
    StagingError,
    check_against,
    tensor_nbytes,
)
from hotswap_engine.transport.p2p import P2PEndpoint, P2PError, PeerSource

DEFAULT_TIMEOUT_S = 300.0


class TrainerUnavailable(StagingError):
    """A trainer rank could not be reached, or went away during the read."""


def part_name(index: int, source: protocol.P2PSource) -> str:
    """How a trainer rank is named in plans and messages."""
    return f"trainer part {index} ({source.endpoint})"


def manifest_specs(source: protocol.TrainerSource) -> list[protocol.TensorSpec]:
    return [protocol.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in source.tensors]


def check_manifest(source: protocol.TrainerSource, expected: Sequence[protocol.TensorSpec] | None) -> None:
    """The manifest against its checksum and the served model; raises before any byte moves."""
    if protocol.trainer_checksum(source.tensors) != source.checksum:
        raise ManifestMismatch("the trainer's manifest does not match its checksum")
    specs = manifest_specs(source)
    for s in specs:
        tensor_nbytes(s.dtype, s.shape)  # an unknown dtype is refused here
    if expected is not None:
        check_against(specs, expected)


def _part_layout(
    specs: Sequence[protocol.TensorSpec], part: protocol.PartSpec | None
) -> tuple[dict[str, int], buckets.PartLayout]:
    """This pod's share of the version, laid out as `staging.stage` lays out a checkpoint's part."""
    count = part.count if part is not None else 1
    index = part.index if part is not None else 0
    sizes = [(s.name, tensor_nbytes(s.dtype, s.shape)) for s in sorted(specs, key=lambda s: s.name)]
    assignment = buckets.assign_parts(sizes, count)
    items = [buckets.TensorItem(name, n, assignment[name]) for name, n in sizes]
    return assignment, buckets.layout_part(items, index)


def _holder(
    endpoint: P2PEndpoint,
    name: str,
    source: PeerSource,
    dest: VersionLayout,
    manifest: dict[str, protocol.TrainerTensor],
    timeout_s: float,
) -> Holder:
    """Contact one trainer rank: read its table (checked against its digest), check every tensor
    in it against the manifest, and keep what this pod needs."""
    probe = getattr(endpoint.engine, "send_probe", None)  # absent from older Mooncake builds
    if probe is not None and (rc := probe(source.endpoint)) != 0:
        raise TrainerUnavailable(f"{name} did not answer ({rc}): is the trainer still running?")
    try:
        held = endpoint.fetch_layout(source, timeout_s)
    except (P2PError, ValueError) as e:
        raise TrainerUnavailable(f"{name}: {e}") from e
    for t in held.tensors:
        want = manifest.get(t.name)
        if want is None:
            raise ManifestMismatch(f"{name} holds {t.name!r}, which the version's manifest lacks")
        if (t.dtype, tuple(t.shape)) != (want.dtype, tuple(want.shape)):
            raise ManifestMismatch(
                f"{name}: {t.name!r} is {t.dtype}{list(t.shape)} there, "
                f"{want.dtype}{list(want.shape)} in the manifest"
            )
    for seg, size in held.segments:
        if source.buffer(seg).nbytes < size:
            raise ManifestMismatch(f"{name}: buffer {seg} is smaller than its table says")
    mine = tuple(t for t in held.tensors if dest.get(t.name) is not None)
    return Holder.from_layouts(name, dest, VersionLayout(mine, held.segments))


def stage_from_trainer(
    endpoint: P2PEndpoint,
    source: protocol.TrainerSource,
    part: protocol.PartSpec | None,
    expected: Sequence[protocol.TensorSpec] | None,
    *,
    pool: HostBufferPool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> StagedCheckpoint:
    """Read this pod's `part` of a trainer-held version into one host buffer (blocking).

    Raises `CheckpointMismatch`/`ManifestMismatch` (nothing read) when the version does not fit the
    served model or the ranks' tables disagree with the manifest, and `TrainerUnavailable` when a
    rank cannot be reached or disappears mid-read.
    """
    check_manifest(source, expected)
    specs = manifest_specs(source)
    assignment, layout = _part_layout(specs, part)
    by_name = {s.name: s for s in specs}
    dest = VersionLayout.single(
        (
            TensorEntry(p.name, by_name[p.name].dtype, tuple(by_name[p.name].shape), p.offset, p.nbytes)
            for p in layout.placements
        ),
        layout.nbytes,
    )
    manifest = {t.name: t for t in source.tensors}
    sources = {part_name(i, p): PeerSource.from_dict(p.model_dump()) for i, p in enumerate(source.parts)}

    # Every rank at once (one first contact may take up to the connect timeout).
    connect_timeout = min(timeout_s, 10.0)
    with ThreadPoolExecutor(max_workers=min(16, len(sources)), thread_name_prefix="trainer-contact") as ex:
        futures = {
            name: ex.submit(_holder, endpoint, name, src, dest, manifest, connect_timeout)
            for name, src in sources.items()
        }
        holders = [f.result() for f in futures.values()]  # the first rank's error, if any, raises
    try:
        plan = plan_reads(dest, holders, chunk_bytes)
    except NoHolderLeft as e:  # the ranks' tables together lack tensors the manifest lists
        raise ManifestMismatch(f"the trainer's parts do not hold the whole version: {e}") from e

    index = part.index if part is not None else 0
    count = part.count if part is not None else 1
    buffer = pool.acquire(layout.nbytes) if pool is not None else HostBuffer(layout.nbytes, pinned=False)
    used = {h.name: src for h in holders if (src := sources.get(h.name)) is not None}
    try:
        try:
            endpoint.pull(plan, buffer, used, progress=progress, timeout_s=timeout_s)
        except NoHolderLeft as e:
            lost = ", ".join(e.failed) or "a trainer rank"
            raise TrainerUnavailable(
                f"{lost} went away mid-read ({sum(r.length for r in e.missing)} bytes unread): "
                "the trainer must keep a version's memory until the version is Complete"
            ) from e
        except P2PError as e:
            raise TrainerUnavailable(f"reading from the trainer failed: {e}") from e
        staged = StagedCheckpoint(specs, assignment, count, {index: buffer})
        _verify(staged, manifest)
    except BaseException:
        buffer.close()
        raise
    return staged


def _verify(staged: StagedCheckpoint, manifest: dict[str, protocol.TrainerTensor]) -> None:
    """Every tensor read against its fingerprint in the manifest (the checksum covers those)."""
    bad = sorted(
        name for name in staged.tensors if digest.fingerprint(staged.view(name)) != manifest[name].fingerprint
    )
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointMismatch(
            f"tensors read from the trainer do not match their fingerprints: {shown} "
            "(did the trainer reuse the version's memory before the version was Complete?)"
        )
