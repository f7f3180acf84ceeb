"""Wire format of the hand-off: msgpack maps, never pickle.

Torch-free and I/O-free so it can be unit-tested alone and read as the protocol's definition.

Sender (agent, ROUTER) → receivers (vLLM workers, DEALER):
  begin  {version, slots: [slot handle, ...]}
  bucket {slot, seq, entries: [entry, ...]}
  end    {}
  abort  {reason}
Receivers → sender:
  hello  {rank, device_uuid}        once, right after connecting
  ack    {seq}                      the bucket's bytes were consumed; its slot may be reused
  done   {}                         the worker applied everything after `end`
  error  {message}                  the worker failed; the sender raises
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import msgpack

# Bytes per element of every safetensors dtype code the hand-off accepts.
DTYPE_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# A message is small (descriptors only); anything larger is malformed or hostile.
MAX_MESSAGE_BYTES = 64 << 20


class MsgType(StrEnum):
    HELLO = "hello"
    BEGIN = "begin"
    BUCKET = "bucket"
    END = "end"
    ABORT = "abort"
    ACK = "ack"
    DONE = "done"
    ERROR = "error"


class HandoffError(RuntimeError):
    """Base of every hand-off failure."""


class HandoffTimeout(HandoffError):
    """The peer did not answer within the timeout (dead, hung or far too slow)."""


class HandoffPeerLost(HandoffError):
    """A peer's connection closed during a session."""


class HandoffAborted(HandoffError):
    """The sender aborted the session (raised on the receiver)."""


class HandoffRemoteError(HandoffError):
    """A receiver reported an error (raised on the sender)."""


class HandoffProtocolError(HandoffError):
    """A message that does not follow this module's format."""


@dataclass(frozen=True)
class Entry:
    """Bytes `[offset, offset + nbytes)` of a slot hold bytes `[tensor_offset, tensor_offset + nbytes)`
    of tensor `name`, whose full size is `tensor_nbytes`. A tensor larger than a bucket is sent as
    several entries (chunks) in increasing `tensor_offset`."""

    name: str
    dtype: str  # safetensors dtype code: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    tensor_offset: int = 0
    tensor_nbytes: int = -1  # -1: the entry is the whole tensor (tensor_nbytes = nbytes)

    def __post_init__(self) -> None:
        if self.tensor_nbytes == -1:
            object.__setattr__(self, "tensor_nbytes", self.nbytes)
        self.validate()

    @property
    def whole(self) -> bool:
        return self.tensor_offset == 0 and self.nbytes == self.tensor_nbytes

    @property
    def last_chunk(self) -> bool:
        return self.tensor_offset + self.nbytes == self.tensor_nbytes

    def validate(self, slot_nbytes: int | None = None) -> None:
        if not self.name:
            raise HandoffProtocolError("entry without a name")
        itemsize = DTYPE_ITEMSIZE.get(self.dtype)
        if itemsize is None:
            raise HandoffProtocolError(f"{self.name}: unsupported dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise HandoffProtocolError(f"{self.name}: negative dimension in shape {self.shape}")
        expected = math.prod(self.shape) * itemsize
        if self.tensor_nbytes != expected:
            raise HandoffProtocolError(
                f"{self.name}: tensor_nbytes {self.tensor_nbytes} != {expected} "
                f"for {self.dtype}{list(self.shape)}"
            )
        if self.offset < 0 or self.nbytes < 0 or self.tensor_offset < 0:
            raise HandoffProtocolError(f"{self.name}: negative offset or size")
        if self.tensor_offset + self.nbytes > self.tensor_nbytes:
            raise HandoffProtocolError(f"{self.name}: chunk ends past the tensor's end")
        if slot_nbytes is not None and self.offset + self.nbytes > slot_nbytes:
            raise HandoffProtocolError(
                f"{self.name}: bytes [{self.offset}, {self.offset + self.nbytes}) "
                f"outside the slot of {slot_nbytes}"
            )

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "tensor_offset": self.tensor_offset,
            "tensor_nbytes": self.tensor_nbytes,
        }

    @classmethod
    def from_wire(cls, data: object) -> Entry:
        if not isinstance(data, dict):
            raise HandoffProtocolError(f"entry is not a map: {type(data).__name__}")
        try:
            name, dtype, shape = data["name"], data["dtype"], data["shape"]
            ints = [data[k] for k in ("offset", "nbytes", "tensor_offset", "tensor_nbytes")]
        except KeyError as e:
            raise HandoffProtocolError(f"entry misses field {e}") from None
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
            raise HandoffProtocolError("entry name/dtype/shape have wrong types")
        if not all(_is_int(v) for v in [*shape, *ints]):
            raise HandoffProtocolError(f"{name}: offsets, sizes and shape must be integers")
        return cls(name, dtype, tuple(shape), *ints)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode(kind: MsgType, **fields: Any) -> bytes:
    return msgpack.packb({"type": kind.value, **fields}, use_bin_type=True)


def decode(frame: bytes) -> tuple[MsgType, dict[str, Any]]:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise HandoffProtocolError(f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise HandoffProtocolError(f"undecodable message: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise HandoffProtocolError("message is not a map with a string `type`")
    try:
        kind = MsgType(msg.pop("type"))
    except ValueError:
        raise HandoffProtocolError("unknown message type") from None
    return kind, msg


def get_field(msg: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    """A required message field of the given type (bool is never accepted as an int)."""
    value = msg.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise HandoffProtocolError(f"field {key!r} missing or not {typ}")
    return value


def check_endpoint(endpoint: str) -> None:
    """Only local transports: the hand-off carries no authentication, so it must never listen on an
    address another machine can reach. ipc:// (a unix socket in the pod's shared volume), inproc://,
    or tcp:// on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc") and rest:
        return
    if scheme == "tcp":
        host = urlsplit(endpoint).hostname or ""
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise ValueError(f"hand-off endpoint {endpoint!r}: tcp only on a loopback address")
    raise ValueError(f"hand-off endpoint {endpoint!r}: expected ipc://PATH or tcp://127.0.0.1:PORT")
