"""A trainer rank's published versions: tensors copied into pinned host memory registered with its
Mooncake transfer engine, where the agents read them with one-sided reads (the rank does no work per
read).

What a rank registers has the form of a peer's staged version (`protocol.P2PSource`): one buffer,
and the part's tensor table as canonical JSON (`p2p_plan.VersionLayout`, the format the agents parse)
in a small registered blob whose sha256 travels with the WeightVersion. Both definitions are
imported, not copied, so the two sides cannot drift apart.

Buffers are slots reused across versions of the same model: allocating and pinning (and registering
with Mooncake) happen once per slot, not per training step. A version's slot is busy until the
publisher releases the version; the blob (a few KiB) is registered per version.

Addresses are configuration: `local_hostname` is the address the pods reach this rank on.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from hotswap_api import protocol
from hotswap_engine import digest
from hotswap_engine.p2p_plan import TensorEntry, VersionLayout

log = logging.getLogger(__name__)

ALIGNMENT = 256  # tensors start at aligned offsets: a GPU copy out of the buffer is never misaligned
P2PHANDSHAKE = "P2PHANDSHAKE"

# torch dtype -> safetensors dtype name (what the manifest and the agents' checks use).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}


class PublishError(RuntimeError):
    """A version could not be published; the message says why (nothing was created)."""


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass
class _Slot:
    """One host buffer, registered once and reused across versions."""

    tensor: torch.Tensor  # flat uint8
    pinned: bool
    version: str | None = None  # the version it holds (None: free)

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())

    @property
    def capacity(self) -> int:
        return int(self.tensor.numel())


@dataclass
class _Held:
    slot: _Slot
    blob: ctypes.Array[ctypes.c_char]
    part: protocol.P2PSource
    tensors: tuple[protocol.TrainerTensor, ...]


@dataclass(frozen=True)
class PartDescriptor:
    """What one rank contributes to a version: its registered part and its tensors' manifest."""

    part: protocol.P2PSource
    tensors: tuple[protocol.TrainerTensor, ...]

    def encode(self) -> bytes:
        return (
            b'{"part":'
            + self.part.model_dump_json().encode()
            + b',"tensors":['
            + b",".join(t.model_dump_json().encode() for t in self.tensors)
            + b"]}"
        )

    @classmethod
    def decode(cls, data: bytes) -> PartDescriptor:
        """The inverse of `encode` (JSON: these bytes cross the trainer's process group)."""
        import json

        raw = json.loads(data)
        return cls(
            protocol.P2PSource.model_validate(raw["part"]),
            tuple(protocol.TrainerTensor.model_validate(t) for t in raw["tensors"]),
        )


class TrainerMemory:
    """One Mooncake transfer engine for this rank, and the versions it holds.

    `pinned=None` pins exactly when CUDA is usable (a pinned buffer is what makes the copy off the
    GPU run at the link's rate); `max_slots` bounds the buffers (and so the versions) held at once.
    """

    def __init__(
        self,
        local_hostname: str,
        *,
        protocol_name: str = "tcp",
        device_name: str = "",
        metadata: str = P2PHANDSHAKE,
        pinned: bool | None = None,
        max_slots: int = 2,
    ) -> None:
        if not local_hostname:
            raise PublishError("local_hostname is required: the address the pods reach this trainer on")
        if max_slots < 1:
            raise PublishError(f"max_slots must be at least 1, got {max_slots}")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise PublishError(f"the Mooncake transfer engine is not importable: {e}") from e
        self._engine = TransferEngine()
        rc = self._engine.initialize(local_hostname, metadata, protocol_name, device_name)
        if rc != 0:
            raise PublishError(f"Mooncake initialize({local_hostname!r}, {protocol_name!r}) failed: {rc}")
        self.endpoint = (
            f"{local_hostname}:{self._engine.get_rpc_port()}" if metadata == P2PHANDSHAKE else local_hostname
        )
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.max_slots = max_slots
        self._slots: list[_Slot] = []
        self._held: dict[str, _Held] = {}
        # Tables of released versions stay allocated a while: a read under way must not touch freed memory.
        self._retired: collections.deque[ctypes.Array[ctypes.c_char]] = collections.deque(maxlen=16)
        self._lock = threading.Lock()
        self.allocations = 0  # slots ever allocated (reuse shows as no growth; tests and metrics)

    @property
    def versions(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._held)

    @property
    def free_slots(self) -> int:
        with self._lock:
            free = sum(1 for s in self._slots if s.version is None)
            return free + self.max_slots - len(self._slots)

    def hold(self, version: str, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> PartDescriptor:
        """Copy the tensors into a free slot and register the part's table; returns the descriptor."""
        tensors: list[tuple[str, torch.Tensor]] = []
        seen: set[str] = set()
        for name, t in named_tensors:
            if not isinstance(name, str) or not name:
                raise PublishError(f"tensor names must be non-empty strings, got {name!r}")
            if name in seen:
                raise PublishError(f"tensor {name!r} is given twice")
            if not isinstance(t, torch.Tensor):
                raise PublishError(f"{name!r} is a {type(t).__name__}, not a tensor")
            if t.dtype not in DTYPE_NAMES:
                raise PublishError(f"{name!r}: dtype {t.dtype} has no safetensors name")
            seen.add(name)
            tensors.append((name, t.detach()))
        if not tensors:
            raise PublishError("nothing to publish: no tensors given")
        tensors.sort(key=lambda nt: nt[0])
        entries: list[TensorEntry] = []
        offset = 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            entries.append(TensorEntry(name, DTYPE_NAMES[t.dtype], tuple(t.shape), offset, nbytes, 0))
            offset = _align(offset + nbytes)
        total = max(offset, 1)
        with self._lock:
            if version in self._held:
                raise PublishError(
                    f"version {version} is already held by this trainer: publish a new version"
                )
            slot = self._take_slot(total, version)
        try:
            manifest = self._fill(slot, tensors, entries)
            layout = VersionLayout.single(entries, total)
            blob_bytes = layout.encode()
            blob = ctypes.create_string_buffer(blob_bytes, len(blob_bytes))
            rc = self._engine.register_memory(ctypes.addressof(blob), len(blob_bytes))
            if rc != 0:
                raise PublishError(f"Mooncake register_memory of the tensor table failed: {rc}")
        except BaseException:
            with self._lock:
                slot.version = None
            raise
        part = protocol.P2PSource(
            endpoint=self.endpoint,
            version=version,
            buffers=(protocol.P2PBuffer(segment=0, address=slot.address, nbytes=total),),
            layout_address=ctypes.addressof(blob),
            layout_nbytes=len(blob_bytes),
            layout_sha256=hashlib.sha256(blob_bytes).hexdigest(),
        )
        with self._lock:
            self._held[version] = _Held(slot, blob, part, manifest)
        return PartDescriptor(part, manifest)

    def _take_slot(self, nbytes: int, version: str) -> _Slot:
        """A free slot that fits (the smallest), else a new one while under `max_slots`. Lock held."""
        fits = [s for s in self._slots if s.version is None and s.capacity >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: s.capacity)
        else:
            free = [s for s in self._slots if s.version is None]
            if len(self._slots) >= self.max_slots and not free:
                raise PublishError(
                    f"this trainer holds {len(self._held)} version(s) ({', '.join(self._held)}), its cap: "
                    "wait for one to be Complete (handle.wait) or raise max_versions"
                )
            if len(self._slots) >= self.max_slots:  # too small a free slot: replace it
                old = max(free, key=lambda s: s.capacity)
                self._slots.remove(old)
                self._drop_slot(old)
            slot = self._new_slot(nbytes)
            self._slots.append(slot)
        slot.version = version
        return slot

    def _new_slot(self, nbytes: int) -> _Slot:
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        pinned = False
        if self.pinned:
            # Page-locked in place rather than through torch's pinned allocator, which rounds sizes up
            # to a power of two; registered once, for every CUDA context of the process (flag 1).
            err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 1)
            if int(err) != 0:
                raise PublishError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
            pinned = True
        rc = self._engine.register_memory(int(tensor.data_ptr()), nbytes)
        if rc != 0:
            if pinned:
                torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
            raise PublishError(f"Mooncake register_memory of {nbytes} bytes failed: {rc}")
        self.allocations += 1
        return _Slot(tensor, pinned)

    def _drop_slot(self, slot: _Slot) -> None:
        self._engine.unregister_memory(slot.address)
        if slot.pinned:
            torch.cuda.cudart().cudaHostUnregister(slot.tensor.data_ptr())

    def _fill(
        self, slot: _Slot, tensors: list[tuple[str, torch.Tensor]], entries: list[TensorEntry]
    ) -> tuple[protocol.TrainerTensor, ...]:
        """Copy every tensor into the slot (GPU tensors asynchronously, then one synchronise) and
        fingerprint it where it lives (cheap on a GPU)."""
        manifest: list[protocol.TrainerTensor] = []
        cuda = False
        for (name, t), e in zip(tensors, entries, strict=True):
            manifest.append(
                protocol.TrainerTensor(
                    name=name, dtype=e.dtype, shape=e.shape, fingerprint=digest.fingerprint(t)
                )
            )
            if not e.nbytes:
                continue
            src = t.contiguous().reshape(-1).view(torch.uint8)
            cuda = cuda or src.is_cuda
            slot.tensor[e.offset : e.offset + e.nbytes].copy_(src, non_blocking=slot.pinned)
        if cuda:
            torch.cuda.synchronize()
        return tuple(manifest)

    def release(self, version: str) -> None:
        """Stop serving a version: unregister its table and free its slot for the next version.
        A read still under way may see the next version's bytes; the agents' fingerprint check
        refuses those."""
        with self._lock:
            held = self._held.pop(version, None)
            if held is None:
                return
            held.slot.version = None
            self._retired.append(held.blob)
        rc = self._engine.unregister_memory(ctypes.addressof(held.blob))
        if rc != 0:
            log.warning("Mooncake unregister_memory of %s's table returned %s", version, rc)

    def close(self) -> None:
        for version in self.versions:
            self.release(version)
        with self._lock:
            slots, self._slots = self._slots, []
        for slot in slots:
            with contextlib.suppress(Exception):
                self._drop_slot(slot)

    def __enter__(self) -> TrainerMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
