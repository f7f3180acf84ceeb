"""Hand-off of weight buckets from the agent to the vLLM workers in the same pod.

Descriptors travel over ZeroMQ as msgpack (`messages`); bytes stay in shared slot buffers
(`slots`: shared memory on CPU, CUDA IPC on GPU). See docs/engine-internals.md.
"""

from .messages import (
    Entry,
    HandoffAborted,
    HandoffError,
    HandoffPeerLost,
    HandoffProtocolError,
    HandoffRemoteError,
    HandoffTimeout,
    check_endpoint,
)
from .receiver import HandoffReceiver
from .sender import HandoffSender, ReadyEvent, WorkerInfo
from .slots import DTYPE_CODES, TORCH_DTYPES, CudaSlot, SharedMemorySlot, Slot, create_slots, open_slot

__all__ = [
    "DTYPE_CODES",
    "TORCH_DTYPES",
    "CudaSlot",
    "Entry",
    "HandoffAborted",
    "HandoffError",
    "HandoffPeerLost",
    "HandoffProtocolError",
    "HandoffReceiver",
    "HandoffRemoteError",
    "HandoffSender",
    "HandoffTimeout",
    "ReadyEvent",
    "SharedMemorySlot",
    "Slot",
    "WorkerInfo",
    "check_endpoint",
    "create_slots",
    "open_slot",
]
