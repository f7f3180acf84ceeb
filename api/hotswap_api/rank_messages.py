"""Messages between the agent and its rank workers (one process per GPU of the pod).

The agent sends commands (`map`, `unmap`, `prepare`, `group`, `broadcast`, `discard`, `exit`); a
worker answers each with one `result` (`broadcast` sends `progress` events before it) and greets the
agent with `hello` when it starts. `hotswap_engine.agent.ranks` frames them (msgpack over a unix
socketpair, host buffers as memfds beside the frame) and checks every frame against these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError as _ValidationError

MAX_FDS = 64  # host buffers (memfds) per message


class ProtocolError(ValueError):
    """A malformed message between the agent and a rank worker."""


# Every message is a msgpack map with an `op`, validated against its op's model below on decode
# (both directions): a frame that does not decode, names an unknown op, or misses or mistypes a
# field is a `ProtocolError`, never a KeyError or TypeError deep inside a handler. Scalars are
# strict (no "1" for 1); msgpack arrays may stand for tuples.

NonNegative = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
Seconds = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BufferWire(_Wire):
    id: NonNegative
    nbytes: NonNegative
    capacity: NonNegative


class MapMsg(_Wire):
    """Map host buffers (their memfds ride on the frame, one per entry, in order)."""

    op: Literal["map"]
    buffers: tuple[BufferWire, ...] = Field(max_length=MAX_FDS)


class UnmapMsg(_Wire):
    op: Literal["unmap"]
    ids: tuple[NonNegative, ...] = ()


class GroupMsg(_Wire):
    """`group` forms (or reuses) the process group; `prepare` asks whether forming it would
    abandon a healthy NCCL group of another membership."""

    op: Literal["group", "prepare"]
    members: tuple[StrictStr, ...] = Field(min_length=1)
    master_addr: StrictStr
    master_port: Annotated[StrictInt, Field(ge=1, le=65535)]
    backend: Literal["nccl", "gloo"]
    rank: NonNegative


class StagedWire(_Wire):
    specs: tuple[tuple[StrictStr, StrictStr, tuple[NonNegative, ...]], ...]
    assignment: dict[StrictStr, NonNegative]
    part_count: Positive
    alignment: Positive
    segments: dict[NonNegative, NonNegative]  # part -> buffer id


class BroadcastMsg(_Wire):
    op: Literal["broadcast"]
    version: StrictStr
    staged: StagedWire
    full_out: dict[NonNegative, NonNegative] = Field(default_factory=dict)  # part -> buffer id
    pod_parts: tuple[tuple[NonNegative, Positive] | None, ...]
    local: Positive
    bucket_bytes: Positive
    slots: Positive
    op_timeout: Seconds | None = None
    max_rate: Positive | None = None
    end: StrictBool = True


class DiscardMsg(_Wire):
    op: Literal["discard"]


class ExitMsg(_Wire):
    op: Literal["exit"]


class HelloMsg(_Wire):
    op: Literal["hello"]
    pid: Positive
    local_rank: NonNegative
    endpoint: StrictStr
    device: StrictStr


class ProgressMsg(_Wire):
    op: Literal["progress"]
    bytes: NonNegative


class ResultMsg(_Wire):
    op: Literal["result"]
    ok: StrictBool
    error: StrictStr | None = None
    exiting: StrictBool = False
    seconds: Annotated[StrictFloat, Field(allow_inf_nan=False)] | None = None
    restart: StrictBool | None = None
    stats: dict[StrictStr, Any] | None = None


Message = Annotated[
    MapMsg | UnmapMsg | GroupMsg | BroadcastMsg | DiscardMsg | ExitMsg | HelloMsg | ProgressMsg | ResultMsg,
    Field(discriminator="op"),
]
_MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


def validate(message: object) -> Message:
    """The typed message `message` (a decoded map) stands for; `ProtocolError` if it is none."""
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError(f"a message must be a map with an `op`, got {type(message).__name__}")
    try:
        return _MESSAGE.validate_python(message)
    except _ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'message'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ProtocolError(f"malformed `{str(message['op'])[:40]}` message: {problems}") from None
