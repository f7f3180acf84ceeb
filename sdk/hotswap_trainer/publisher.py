"""`Publisher`: publish new weights from the trainer's memory to an InferencePool.

    pub = Publisher("my-pool", "default", local_hostname=os.environ["POD_IP"])
    handle = pub.publish("step-42", model.state_dict().items())
    handle.wait(timeout=120)   # returns when every replica serves step-42; raises if it failed

Several ranks (FSDP/TP-style) each publish a disjoint part of one version: every rank of the
trainer's torch.distributed group calls `publish` with the same version and its own tensors. The
ranks exchange their part descriptors over that group (JSON bytes, never pickle: `gather`), rank 0
checks that the parts are disjoint and creates the WeightVersion, and every rank learns the outcome,
so all of them return a handle or all of them raise the same error. The version exists once every
part is registered.

Each rank needs cluster credentials (it checks the pool when it starts and reads its versions'
phases to know when it may release their memory).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import torch
from hotswap_api import protocol
from hotswap_api.resources import VERSION_PATTERN, TrainerSourceRef

from hotswap_trainer import gather, kube, retention
from hotswap_trainer.memory import PartDescriptor, PublishError, TrainerMemory


class PublishFailed(RuntimeError):
    """The WeightVersion failed (or was superseded); the message is the operator's."""

    def __init__(self, version: str, phase: str, message: str) -> None:
        super().__init__(f"version {version} {phase.lower()}: {message}")
        self.version = version
        self.phase = phase
        self.message = message


class PublishHandle:
    """A published version: `wait` for it to be served everywhere."""

    def __init__(self, publisher: Publisher, version: str, published_at: float) -> None:
        self.publisher = publisher
        self.version = version
        self.published_at = published_at  # time.monotonic() when publish() was called
        self.completed_at: float | None = None

    def phase(self) -> tuple[str | None, str]:
        """(phase, message) of the WeightVersion now."""
        return self.publisher.api.phase(self.version)

    def wait(self, timeout: float = 600.0) -> None:
        """Return when the WeightVersion is Complete (every replica serves it); raise `PublishFailed`
        with the operator's message when it Failed or was Superseded, TimeoutError after `timeout`."""
        phase, message = self.publisher.api.wait_terminal(self.version, timeout)
        self.completed_at = time.monotonic()
        self.publisher.reclaim()
        if phase != "Complete":
            raise PublishFailed(self.version, phase, message)

    @property
    def seconds(self) -> float | None:
        """publish() to Complete, once `wait` returned."""
        return None if self.completed_at is None else self.completed_at - self.published_at


class Publisher:
    """Publishes versions of one model to `pool` in `namespace`.

    `local_hostname`: the address the pool's pods reach this rank on (configuration, never
    guessed). `max_versions`: how many versions this rank holds at most (each one a pinned buffer
    of its part, reused by later versions). `group`: the trainer's process group (default: the
    world, when torch.distributed is initialised; else this process alone). `timeout`: the
    WeightVersions' rollout timeout.
    """

    def __init__(
        self,
        pool: str,
        namespace: str = "default",
        *,
        local_hostname: str,
        max_versions: int = 2,
        group: Any = None,
        protocol_name: str = "tcp",
        device_name: str = "",
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: Any = None,
        pinned: bool | None = None,
        timeout: str = "10m",
    ) -> None:
        self.group = group
        self.distributed = _distributed(group)
        self.rank = torch.distributed.get_rank(group) if self.distributed else 0
        client = api_client if api_client is not None else kube.connect(kubeconfig, context)
        self.api = kube.PoolApi(client, pool, namespace)
        self.api.check_pool()
        self.memory = TrainerMemory(
            local_hostname,
            protocol_name=protocol_name,
            device_name=device_name,
            pinned=pinned,
            max_slots=max_versions,
        )
        self.max_versions = max_versions
        self.timeout = timeout
        self._order: list[str] = []  # held versions, in publish order

    # ---- publishing -----------------------------------------------------------------------------

    def publish(self, version: str, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> PublishHandle:
        """Hold `named_tensors` (this rank's part) in registered memory and, once every rank's part
        is registered, create the WeightVersion. A collective when the trainer has several ranks."""
        started = time.monotonic()
        problem = self._precheck(version)
        self._agree(problem)
        try:
            held = self.memory.hold(version, named_tensors)
            descriptor: PartDescriptor | None = held
            payload = b"D" + held.encode()
        except Exception as e:  # any failure must reach the other ranks, or they wait forever
            descriptor = None
            payload = b"E" + f"rank {self.rank}: {e}".encode()
        parts = gather.all_gather_bytes(payload, self.group) if self.distributed else [payload]
        errors = [p[1:].decode() for p in parts if p[:1] == b"E"]
        outcome = "; ".join(errors)
        if not outcome and self.rank == 0:
            try:
                outcome = self._create(version, [PartDescriptor.decode(p[1:]) for p in parts])
            except Exception as e:  # e.g. a manifest the CRD's bounds refuse: every rank learns it
                outcome = f"cannot create WeightVersion {self.api.name(version)}: {e}"
        if self.distributed:
            outcome = gather.broadcast_bytes(outcome.encode(), 0, self.group).decode()
        if outcome:
            if descriptor is not None:
                self.memory.release(version)
            raise PublishError(outcome)
        self._order.append(version)
        return PublishHandle(self, version, started)

    def _precheck(self, version: str) -> str:
        """Why `version` cannot be published now ("" when it can); touches no memory."""
        if not re.match(VERSION_PATTERN, version) or len(version) > 63:
            return f"invalid version {version!r}: lowercase letters, digits, '-' and '.', at most 63"
        try:
            if self.rank == 0 and self.api.get(version) is not None:
                return (
                    f"WeightVersion {self.api.name(version)} already exists: a version names one set of "
                    "weights, publish a new version"
                )
            self.reclaim(need_room=True)
        except PublishError as e:
            return str(e)
        if self.memory.free_slots < 1:
            held = ", ".join(self._order)
            return (
                f"rank {self.rank} holds {len(self._order)} version(s) still rolling out ({held}), its "
                f"cap of {self.max_versions}: wait for one (handle.wait) or raise max_versions"
            )
        return ""

    def _agree(self, problem: str) -> None:
        """Raise on every rank when any rank found a problem (before any memory is touched)."""
        if self.distributed:
            problems = [p.decode() for p in gather.all_gather_bytes(problem.encode(), self.group) if p]
        else:
            problems = [problem] if problem else []
        if problems:
            raise PublishError("; ".join(problems))

    def _create(self, version: str, parts: list[PartDescriptor]) -> str:
        """Rank 0: the WeightVersion from every rank's part ("" on success, else why not)."""
        owner: dict[str, int] = {}
        for i, d in enumerate(parts):
            for t in d.tensors:
                if t.name in owner:
                    return (
                        f"tensor {t.name!r} is published by ranks {owner[t.name]} and {i}: "
                        "parts must be disjoint"
                    )
                owner[t.name] = i
        tensors = tuple(sorted((t for d in parts for t in d.tensors), key=lambda t: t.name))
        source = protocol.TrainerSource(
            parts=tuple(d.part for d in parts), tensors=tensors, checksum=protocol.trainer_checksum(tensors)
        )
        trainer = TrainerSourceRef.model_validate(source.model_dump())
        try:
            self.api.create(self.api.body(version, trainer, self.timeout))
        except PublishError as e:
            return str(e)
        return ""

    # ---- memory -------------------------------------------------------------------------------

    def reclaim(self, need_room: bool = False) -> list[str]:
        """Release the versions nobody will read any more (`retention.releasable`); returns them."""
        phases: dict[str, str | None] = {}
        for v in self._order:
            try:
                phases[v] = self.api.phase(v)[0]
            except PublishError:
                continue  # unknown: kept
        release = retention.releasable(self._order, phases, need_room=need_room, cap=self.max_versions)
        for v in release:
            self.memory.release(v)
            self._order.remove(v)
        return release

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions this rank holds, oldest first."""
        return tuple(self._order)

    def close(self) -> None:
        """Release every version (pods still reading one fail it) and the transfer engine's memory."""
        self._order.clear()
        self.memory.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _distributed(group: Any) -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)
