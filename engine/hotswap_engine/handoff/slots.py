"""Slot buffers shared between the agent and the vLLM workers, and their msgpack-able handles.

CPU: a file in shared memory (/dev/shm) that both processes map with `torch.from_file(shared=True)`.
GPU: a CUDA tensor whose storage is exported with CUDA IPC (`_share_cuda_`) and rebuilt in the
worker with `UntypedStorage._new_shared_cuda`, the same calls torch.multiprocessing makes, minus
pickle. The handle names the device by UUID because the two processes may number GPUs differently
(different CUDA_VISIBLE_DEVICES); torch's UUID string has no "GPU-" prefix, nvidia-smi's has.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

from .messages import HandoffProtocolError, get_field

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

DEFAULT_SHM_DIR = "/dev/shm"
SLOT_PREFIX = "hotswap-slot-"  # then "<creator pid>-<uuid>"


def normalize_uuid(value: str) -> str:
    value = value.strip().lower()
    return value.removeprefix("gpu-")


def device_uuid(device: torch.device) -> str:
    """The device's UUID without prefix, "" for CPU."""
    if device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return normalize_uuid(str(torch.cuda.get_device_properties(index).uuid))


def cuda_index_of(uuid_str: str) -> int:
    """This process's index of the GPU with the given UUID."""
    wanted = normalize_uuid(uuid_str)
    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == wanted:
            return index
    raise HandoffProtocolError(f"GPU {uuid_str} is not visible to this process")


class Slot:
    """One reusable byte buffer. `tensor` is 1-D uint8; `handle()` describes it to a receiver."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError("a slot is a contiguous 1-D uint8 tensor")
        self.tensor = tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def handle(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SharedMemorySlot(Slot):
    def __init__(self, path: Path, nbytes: int) -> None:
        super().__init__(torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8))
        self.path = path

    @classmethod
    def create(cls, nbytes: int, directory: str | os.PathLike[str] = DEFAULT_SHM_DIR) -> SharedMemorySlot:
        if nbytes <= 0:
            raise ValueError("slot size must be positive")
        # The creator's pid in the name: slots of a process that died without closing them
        # (SIGKILL) are found and removed by the next creator (`remove_orphan_slots`).
        path = Path(directory) / f"{SLOT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        # Exclusive create: never map over somebody else's file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return cls(path, nbytes)

    def handle(self) -> dict[str, Any]:
        return {"kind": "shm", "path": str(self.path), "nbytes": self.nbytes}

    def close(self) -> None:
        # Existing mappings stay valid after unlink; only new opens fail.
        self.path.unlink(missing_ok=True)


class CudaSlot(Slot):
    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> CudaSlot:
        if nbytes <= 0:
            raise ValueError("slot size must be positive")
        return cls(torch.empty(nbytes, dtype=torch.uint8, device=device))

    def handle(self) -> dict[str, Any]:
        # Each call adds one reference on the producer's IPC ref counter; the receiver's storage drops
        # it when freed. So call it once per receiver per session (the sender does).
        storage = self.tensor.untyped_storage()
        (
            _device,
            ipc_handle,
            storage_size,
            storage_offset,
            ref_counter_handle,
            ref_counter_offset,
            event_handle,
            event_sync_required,
        ) = storage._share_cuda_()
        return {
            "kind": "cuda",
            "device_uuid": device_uuid(self.tensor.device),
            "ipc_handle": ipc_handle,
            "storage_size": storage_size,
            "storage_offset": storage_offset,
            "ref_counter_handle": ref_counter_handle,
            "ref_counter_offset": ref_counter_offset,
            "event_handle": event_handle,
            "event_sync_required": bool(event_sync_required),
            "tensor_offset": self.tensor.storage_offset(),
            "nbytes": self.nbytes,
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_slots(directory: str | os.PathLike[str]) -> list[str]:
    """Unlink the slot files in `directory` whose creator is no longer alive; returns their names.

    The directory is the pod's memory-backed emptyDir: a rank worker or agent killed mid-update
    never closes its slots, and each would hold its bytes of RAM until the pod goes. Safe against
    live users: a process that still maps a file keeps its mapping after the unlink, and a live
    creator's files are left alone (its pid is in the name; the rank workers share the agent's
    container, so its pids are theirs)."""
    removed = []
    for path in Path(directory).glob(f"{SLOT_PREFIX}*"):
        pid = path.name[len(SLOT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def create_slots(
    count: int, nbytes: int, device: torch.device, shm_dir: str | os.PathLike[str] = DEFAULT_SHM_DIR
) -> list[Slot]:
    if device.type == "cuda":
        return [CudaSlot.create(nbytes, device) for _ in range(count)]
    if device.type == "cpu":
        remove_orphan_slots(shm_dir)
        return [SharedMemorySlot.create(nbytes, shm_dir) for _ in range(count)]
    raise ValueError(f"no slot buffers for device type {device.type}")


def open_slot(handle: object) -> torch.Tensor:
    """The receiver's 1-D uint8 view of a sender's slot."""
    if not isinstance(handle, dict):
        raise HandoffProtocolError("slot handle is not a map")
    kind = get_field(handle, "kind", str)
    nbytes = get_field(handle, "nbytes", int)
    if kind == "shm":
        path = Path(get_field(handle, "path", str))
        # Refuse to create: a missing file means a stale or wrong handle, not a new buffer.
        if not path.is_file() or path.stat().st_size < nbytes:
            raise HandoffProtocolError(f"shared-memory slot {path} missing or smaller than {nbytes} bytes")
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    if kind == "cuda":
        return _open_cuda(handle, nbytes)
    raise HandoffProtocolError(f"unknown slot kind {kind!r}")


def _open_cuda(handle: dict[str, Any], nbytes: int) -> torch.Tensor:
    index = cuda_index_of(get_field(handle, "device_uuid", str))
    torch.cuda._lazy_init()
    with torch.cuda.device(index):
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            get_field(handle, "ipc_handle", bytes),
            get_field(handle, "storage_size", int),
            get_field(handle, "storage_offset", int),
            get_field(handle, "ref_counter_handle", bytes),
            get_field(handle, "ref_counter_offset", int),
            handle.get("event_handle"),
            bool(handle.get("event_sync_required")),
        )
    offset = get_field(handle, "tensor_offset", int)
    if offset + nbytes > storage.nbytes():
        raise HandoffProtocolError("CUDA slot handle: view exceeds its storage")
    out = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    out.set_(storage, offset, (nbytes,), (1,))
    return out
