"""The one transport interface: how a version's bytes reach this pod, and the registry that names them.

Modelled on vLLM's `vllm/distributed/weight_transfer/` (a typed engine interface plus a factory
that imports an engine only when it is first asked for by name). The agent's runner picks a
transport by the update request's mode (`protocol.UpdateMode`, the same name on the wire and in
the registry) and drives it through this interface only:

    job  = transport.job(request, staged)          # decide what to do: no I/O, nothing touched
    link = await transport.connect(job, progress)  # stage CONNECTING: group formed / peers reached
    full = await transport.transfer(link, progress)  # stage TRANSFERRING: the bytes move
    if not transport.delivers_to_engine:           # a source that only filled host memory
        the runner hands `full` to the engine through the broadcast of one

Implementations: `Broadcast` (a process group of pods; the rank workers broadcast every bucket
into the workers and the full version's host buffers) and `P2P` (one-sided Mooncake reads of peers'
staged host memory). A new source (e.g. a trainer's memory over Mooncake) implements `Transport`
with `delivers_to_engine = False`, reuses the p2p reader's blocks (`P2PEndpoint.holder(s)`,
`p2p_plan.plan_reads`, `P2PEndpoint.pull`) and registers itself with `register_transport`.

This module is the interface only: no torch, no sockets, no agent imports.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from hotswap_api import protocol

    from hotswap_engine.staging import StagedCheckpoint

JobT = TypeVar("JobT")
LinkT = TypeVar("LinkT")


class UpdateError(RuntimeError):
    """An update failed; the message says where (group, transfer, or the engine's reload).
    `engine_touched` is False when it failed before any byte reached the engine (no rollback needed)."""

    def __init__(self, message: str, *, engine_touched: bool = True) -> None:
        super().__init__(message)
        self.engine_touched = engine_touched


class UpdateProgress(Protocol):
    """What a transport reports while it runs (the agent's `UpdateRecord` is one)."""

    stage: protocol.UpdateStage
    bytes_done: int
    bytes_total: int
    durations: dict[str, float]
    peer_bytes: dict[str, int]
    peers_failed: list[str]
    # The launcher's per-worker results of the apply that delivered the version (with `received`
    # fingerprints: the agent checks them, `agent.verify`).
    engine_workers: list[dict[str, Any]]


class Transport(ABC, Generic[JobT, LinkT]):
    """One way an update's bytes reach this pod.

    `JobT` is what the transport decided from the request (pure, checked before anything is
    touched); `LinkT` what `connect` set up for `transfer` (a formed group, reached peers and a
    read plan). `connect` raises `UpdateError(engine_touched=False)` and leaves nothing behind;
    `transfer` returns the complete version in host memory (the rollback and peer-to-peer source).
    """

    name: ClassVar[str]
    # True: `transfer` also moved the bytes into the engine (and ran its reload). False: it only
    # filled host memory, and the runner hands that copy to the engine afterwards.
    delivers_to_engine: ClassVar[bool]

    @abstractmethod
    def job(self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None) -> JobT:
        """What this request asks of this transport; `UpdateError(engine_touched=False)` if it cannot."""

    @abstractmethod
    async def connect(self, job: JobT, progress: UpdateProgress) -> LinkT:
        """Reach the other side (form the group, contact the peers) and plan the transfer."""

    @abstractmethod
    async def transfer(self, link: LinkT, progress: UpdateProgress) -> StagedCheckpoint:
        """Move the bytes; the complete version in this pod's host memory."""

    def close(self) -> None:  # optional: most transports hold nothing of their own
        """Release what the transport keeps across updates."""


@dataclass(frozen=True)
class _Entry:
    module: str
    attribute: str


# Keyed by `protocol.UpdateMode` values (CamelCase, as on the wire).
_REGISTRY: dict[str, _Entry] = {
    "Broadcast": _Entry("hotswap_engine.agent.transports.broadcast", "GroupBroadcast"),
    "P2P": _Entry("hotswap_engine.agent.transports.p2p", "PeerPull"),
}


def register_transport(name: str, module: str, attribute: str) -> None:
    """Name a transport class (or factory) by its module path; it is imported on first use."""
    if name in _REGISTRY:
        raise ValueError(f"transport {name!r} is registered already")
    _REGISTRY[name] = _Entry(module, attribute)


def registered_transports() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def transport_factory(name: str) -> Callable[..., Transport[Any, Any]]:
    """The class registered as `name`, imported now (its heavy imports stay off other paths)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise KeyError(f"no transport {name!r} (registered: {', '.join(registered_transports())})")
    factory = getattr(importlib.import_module(entry.module), entry.attribute)
    if not callable(factory):
        raise TypeError(f"{entry.module}.{entry.attribute} is not a transport class")
    return factory


def create_transport(name: str, *args: Any, **kwargs: Any) -> Transport[Any, Any]:
    """A transport by its registered name, built with the host's resources (`args`, `kwargs`)."""
    transport = transport_factory(name)(*args, **kwargs)
    if not isinstance(transport, Transport):
        raise TypeError(f"transport {name!r} does not implement hotswap_engine.transport.base.Transport")
    return transport
