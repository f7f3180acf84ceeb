"""Wire models of the agent's HTTP API.

Torch-free and I/O-free on purpose: the agent serves these models and the operator sends them, so the
two sides can never disagree on a field. Enum values follow the CRDs' convention (CamelCase, the same
values as the CRD for the same concept: `RequestPolicy`, `ErrorCode`). Every model forbids unknown
fields, so a typo in a request is a 422 with the field's name rather than a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hotswap_api.errors import ErrorCode
from hotswap_api.policy import RequestPolicy
from hotswap_api.resources import (
    DEFAULT_UPDATE_MEMORY_BUDGET,
    MAX_REPORTED_TENSORS,
    PATH_PATTERN,
    parse_quantity,
)

API_PREFIX = "/v1"
DEFAULT_MEMORY_BUDGET_BYTES = parse_quantity(DEFAULT_UPDATE_MEMORY_BUDGET)  # extra GPU memory per GPU

# A version is a label value on pods (hotswap.dev/weight-version), so it follows label-value rules.
VersionName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"),
]

# A file path as the API takes it: no C0 control characters and no DEL (an embedded NUL byte is a
# path no file can have): `resources.PATH_PATTERN`, the CRDs' own.

# Integers travel on to msgpack frames and native code (Mooncake addresses): bounded to what those
# carry, so an absurd value is a 422 here rather than a failure deep inside an update.
MAX_INT64 = (1 << 63) - 1
MAX_UINT64 = (1 << 64) - 1
MAX_TIMEOUT_SECONDS = 1e9


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Model):
    """One tensor as a safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype name: "BF16", "F32", ...
    shape: tuple[int, ...]


class PartSpec(_Model):
    """Which share of a checkpoint a pod owns: part `index` of `count` (balanced by bytes).

    Every agent derives the same tensor→part assignment from the checkpoint's headers
    (`buckets.assign_parts`), so the operator only hands out indices.
    """

    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _index_in_range(self) -> PartSpec:
        if self.index >= self.count:
            raise ValueError(f"part index {self.index} must be smaller than count {self.count}")
        return self


class P2PBuffer(_Model):
    segment: int = Field(ge=0, le=MAX_INT64)
    address: int = Field(ge=0, le=MAX_UINT64)
    nbytes: int = Field(ge=0, le=MAX_INT64)


class P2PSource(_Model):
    """What a holder publishes per staged version so a new pod can read it with one-sided Mooncake
    reads (`transport.p2p.PeerSource`, field for field). The tensor table itself stays in the
    holder's registered memory (at `layout_address`, checked against `layout_sha256`) rather than
    travelling through the operator."""

    # Mooncake host:rpc_port (or a segment name with a metadata server): handed to native code, so
    # bounded and without whitespace or control characters.
    endpoint: str = Field(min_length=1, max_length=255, pattern=r"^[^\s\x00-\x1f\x7f]+$")
    version: VersionName
    buffers: tuple[P2PBuffer, ...] = Field(min_length=1)
    layout_address: int = Field(ge=0, le=MAX_UINT64)
    layout_nbytes: int = Field(ge=1, le=64 << 20)
    layout_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TrainerTensor(_Model):
    """One tensor of a trainer-published version, as the version's manifest lists it."""

    name: str = Field(min_length=1, max_length=1024)
    dtype: str = Field(min_length=1, max_length=16)  # safetensors dtype name: "BF16", "F32", ...
    shape: tuple[Annotated[int, Field(ge=0, le=MAX_INT64)], ...]
    # `digest.fingerprint` of the tensor's bytes: each agent verifies the tensors it read.
    fingerprint: str = Field(min_length=1, max_length=256)


def trainer_checksum(tensors: tuple[TrainerTensor, ...] | list[TrainerTensor]) -> str:
    """The version's checksum: sha256 of its manifest in canonical JSON (by name), so the per-tensor
    fingerprints, and with them every byte, are covered by one value."""
    rows = sorted([t.name, t.dtype, list(t.shape), t.fingerprint] for t in tensors)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


class TrainerSource(_Model):
    """A version held in the memory of the trainer's ranks (`hotswap_trainer.Publisher`): each rank's
    part is registered with its Mooncake engine exactly like a peer's staged version (`P2PSource`:
    endpoint, buffers, and its tensor table at `layout_address`, checked against `layout_sha256`)."""

    parts: tuple[P2PSource, ...] = Field(min_length=1, max_length=4096)
    tensors: tuple[TrainerTensor, ...] = Field(min_length=1)
    checksum: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _consistent(self) -> TrainerSource:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("the manifest lists a tensor twice")
        if trainer_checksum(self.tensors) != self.checksum:
            raise ValueError("checksum does not match the manifest (names, dtypes, shapes, fingerprints)")
        return self


class Source(_Model):
    """Where a version's bytes are: exactly one of `path` (a directory, sharded with
    model.safetensors.index.json or holding *.safetensors files, or a single .safetensors file,
    inside one of the agent's allowed roots) and `trainer` (the trainer ranks' memory)."""

    path: str | None = Field(default=None, min_length=1, pattern=PATH_PATTERN)
    # Optional JSON manifest {"files": {"<file name>": "<hex sha256>"}} checked before use (paths only).
    sha256_manifest: str | None = Field(default=None, pattern=PATH_PATTERN)
    trainer: TrainerSource | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.path is None) == (self.trainer is None):
            raise ValueError("a source names exactly one of `path` and `trainer`")
        if self.trainer is not None and self.sha256_manifest is not None:
            raise ValueError(
                "`sha256_manifest` applies to a `path` source only (a trainer source has `checksum`)"
            )
        return self

    def describe(self) -> str:
        """For messages: the path, or the trainer's endpoints."""
        if self.trainer is not None:
            return "trainer " + ",".join(p.endpoint for p in self.trainer.parts)
        return repr(self.path)


class StageRequest(_Model):
    version: VersionName
    source: Source
    part: PartSpec | None = None  # None: the whole checkpoint


class StagedVersion(_Model):
    version: VersionName
    source: Source
    part: PartSpec | None
    complete: bool  # holds every tensor (a full copy, usable for rollback and as a p2p source)
    bytes: int
    tensors: int
    stage_seconds: float | None = None
    p2p: P2PSource | None = None  # set once this pod serves the version to peers


class UpdateMode(StrEnum):
    """How this pod receives the version: in the broadcast group, or reading peers (a WeightVersion's
    `Strategy` decides it per pod: with P2P the first pod is a group of one and the rest read it)."""

    BROADCAST = "Broadcast"
    P2P = "P2P"


class GroupMember(_Model):
    rank: int = Field(ge=0)
    pod: str
    address: str  # agent address, used in messages only
    part: PartSpec | None  # the part this member staged and broadcasts


class BroadcastGroup(_Model):
    members: tuple[GroupMember, ...] = Field(min_length=1)
    master_addr: str
    master_port: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _ranks_dense(self) -> BroadcastGroup:
        ranks = sorted(m.rank for m in self.members)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"member ranks must be 0..{len(ranks) - 1} exactly once, got {ranks}")
        return self

    @property
    def world_size(self) -> int:
        return len(self.members)


class PeerPart(_Model):
    """For p2p: a peer that holds the version (what it holds comes from its published table)."""

    pod: str
    source: P2PSource


class UpdateRequest(_Model):
    version: VersionName
    mode: UpdateMode = UpdateMode.BROADCAST
    rank: int | None = Field(default=None, ge=0)  # this pod's rank in `group` (broadcast)
    group: BroadcastGroup | None = None  # broadcast only
    peers: tuple[PeerPart, ...] = ()  # p2p only
    memory_budget_bytes: int = Field(default=DEFAULT_MEMORY_BUDGET_BYTES, ge=1 << 20, le=MAX_INT64)
    request_policy: RequestPolicy = RequestPolicy.KEEP
    timeout_seconds: float = Field(default=300.0, gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)
    # Caps this pod's transfer rate (None: as fast as the hardware goes), for fleets whose network
    # or storage is shared with training traffic.
    max_bytes_per_second: int | None = Field(default=None, ge=1, le=MAX_INT64)
    # Tuning: a fixed bucket size (4 slots) instead of the one derived from the memory budget.
    bucket_bytes: int | None = Field(default=None, ge=4096, le=MAX_INT64)

    @model_validator(mode="after")
    def _bucket_within_budget(self) -> UpdateRequest:
        if self.bucket_bytes is not None and 4 * self.bucket_bytes > self.memory_budget_bytes:
            raise ValueError(
                f"4 slots of bucket_bytes={self.bucket_bytes} exceed "
                f"memory_budget_bytes={self.memory_budget_bytes}"
            )
        return self

    @model_validator(mode="after")
    def _mode_fields(self) -> UpdateRequest:
        if self.mode is UpdateMode.BROADCAST:
            if self.group is None or self.rank is None:
                raise ValueError("a broadcast update needs `group` and this pod's `rank`")
            if self.rank >= self.group.world_size:
                raise ValueError(f"rank {self.rank} is outside the group of {self.group.world_size}")
        elif not self.peers:
            raise ValueError("a p2p update needs at least one entry in `peers`")
        return self


class UpdateStage(StrEnum):
    PENDING = "Pending"
    CONNECTING = "Connecting"  # forming the process group / reaching peers
    TRANSFERRING = "Transferring"  # host→GPU, broadcast/p2p and hand-off, pipelined
    RELOADING = "Reloading"  # vLLM finishing the layerwise reload
    ROLLING_BACK = "RollingBack"
    COMPLETE = "Complete"
    FAILED = "Failed"


class UpdateProgress(_Model):
    id: str
    version: VersionName
    mode: UpdateMode
    stage: UpdateStage
    bytes_done: int = 0
    bytes_total: int = 0
    started_at: datetime
    finished_at: datetime | None = None
    # seconds per stage: "connect", "transfer", "reload", "rollback" ("p2p": the peer-to-peer read)
    durations: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    # The agent's classification of `error` (None: unclassified, transient). A permanent code
    # (`ErrorCode.permanent`) means the same update can never succeed: the operator fails the
    # WeightVersion at once instead of retrying it.
    error_code: ErrorCode | None = None
    # p2p only: bytes each peer (pod name) served, once the read finished, and the peers given up on
    # (unreachable at the start, or failed midway: their unread ranges went to the others)
    peer_bytes: dict[str, int] = Field(default_factory=dict)
    peers_failed: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return self.stage in (UpdateStage.COMPLETE, UpdateStage.FAILED)


class TensorMismatch(_Model):
    """One tensor a vLLM worker received with other bytes than the version's manifest has."""

    tensor: str
    rank: int | None = None  # the vLLM worker (TP rank); None: unknown
    detail: str = ""


class WeightsCheck(_Model):
    """What this pod verified of the version it serves (#12 item 3), after every update.

    `received`: each vLLM worker's per-tensor fingerprints of the bytes it received, compared here
    with the version's manifest (a trainer source's fingerprints; for a path source, those of the
    agent's host copy, the bytes it handed off). `processed_digest`/`processed`: vLLM's
    `compute_weight_checksums` of the processed parameters (sha256 per tensor and worker), which the
    operator compares across the pool's pods."""

    version: VersionName
    received_ok: bool
    # Mismatches of level `Received` (the first MAX_REPORTED_TENSORS), `received_count` of them in all.
    received_mismatches: tuple[TensorMismatch, ...] = Field(default=(), max_length=MAX_REPORTED_TENSORS)
    received_count: int = Field(default=0, ge=0)
    # sha256 over every worker's checksums (sorted JSON); None: the engine did not answer.
    processed_digest: str | None = None
    # Per "<worker key><tensor>": the first 16 hex digits of vLLM's sha256, for naming the tensor that
    # disagrees (64 bits are ample to tell replicas apart; the full value is in the aggregate).
    processed: dict[str, str] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)  # "expected", "processed"


class AgentStatus(_Model):
    pod: str
    # Bumped on every change this status reports (not on byte progress); `GET /status
    # ?waitForChangeAfter=<sequence>` answers once it moved past the given value. Starts at 0 when
    # the agent starts.
    sequence: int = Field(default=0, ge=0)
    serving_version: str | None  # None: serving the base checkpoint it started with
    ready: bool  # serving a fully applied version, no update or rollback running
    # The launcher answered the agent's last health check; False while vLLM is still starting, when
    # an update could only time out waiting for the engine's workers.
    engine_up: bool = True
    staged: tuple[StagedVersion, ...] = ()
    update: UpdateProgress | None = None  # the latest update, running or finished
    last_error: str | None = None
    p2p_endpoint: str | None = None  # Mooncake endpoint of this agent's staged buffers
    # The verification of the served version's weights (None: not verified, e.g. after a rollback).
    weights_check: WeightsCheck | None = None


# The longest one status long-poll may be held open (`StatusWait.timeout_seconds`).
MAX_STATUS_WAIT_SECONDS = 60.0


class StatusWait(_Model):
    """The query of `GET /status`: with `wait_for_change_after`, the agent answers as soon as its
    `AgentStatus.sequence` differs from it (a change, or an agent that restarted and counts from 0
    again), else after `timeout_seconds` with the unchanged status. Without it: at once."""

    wait_for_change_after: int | None = Field(default=None, ge=0, le=MAX_INT64)
    timeout_seconds: float = Field(default=30.0, gt=0, le=MAX_STATUS_WAIT_SECONDS, allow_inf_nan=False)


class ErrorBody(_Model):
    error: ErrorCode
    message: str
