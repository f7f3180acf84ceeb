"""The hand-off's wire format: entries, framing, endpoint policy (no sockets, no torch)."""

from __future__ import annotations

import msgpack
import pytest
from hotswap_engine.handoff.messages import (
    Entry,
    HandoffProtocolError,
    MsgType,
    check_endpoint,
    decode,
    encode,
)


def test_entry_roundtrip_and_defaults() -> None:
    e = Entry("w", "BF16", (4, 8), offset=128, nbytes=64)
    assert e.tensor_nbytes == 64 and e.whole and e.last_chunk
    assert Entry.from_wire(msgpack.unpackb(msgpack.packb(e.to_wire()))) == e
    chunk = Entry("w", "BF16", (4, 8), offset=0, nbytes=16, tensor_offset=16, tensor_nbytes=64)
    assert not chunk.whole and not chunk.last_chunk


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "F128"}, "unsupported dtype"),
        ({"shape": (4, 9)}, "tensor_nbytes"),
        ({"nbytes": 80}, "tensor_nbytes"),
        ({"offset": -1}, "negative"),
        ({"tensor_offset": 32, "nbytes": 48, "tensor_nbytes": 64}, "past the tensor"),
        ({"name": ""}, "without a name"),
    ],
)
def test_entry_rejects_inconsistent_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "w", "dtype": "F32", "shape": (4, 4), "offset": 0, "nbytes": 64}
    fields.update(kwargs)
    with pytest.raises(HandoffProtocolError, match=message):
        Entry(**fields)  # type: ignore[arg-type]


def test_entry_must_fit_its_slot() -> None:
    e = Entry("w", "F32", (4,), offset=100, nbytes=16)
    e.validate(116)
    with pytest.raises(HandoffProtocolError, match="outside the slot"):
        e.validate(115)


@pytest.mark.parametrize(
    "wire",
    [
        [1, 2],
        {"name": "w", "dtype": "F32", "shape": [1]},
        {
            "name": "w",
            "dtype": "F32",
            "shape": [1],
            "offset": True,
            "nbytes": 4,
            "tensor_offset": 0,
            "tensor_nbytes": 4,
        },
        {
            "name": "w",
            "dtype": "F32",
            "shape": ["1"],
            "offset": 0,
            "nbytes": 4,
            "tensor_offset": 0,
            "tensor_nbytes": 4,
        },
    ],
)
def test_entry_from_wire_rejects_malformed(wire: object) -> None:
    with pytest.raises(HandoffProtocolError):
        Entry.from_wire(wire)


def test_frames_are_msgpack_maps() -> None:
    frame = encode(MsgType.ACK, seq=3)
    assert msgpack.unpackb(frame) == {"type": "ack", "seq": 3}
    assert decode(frame) == (MsgType.ACK, {"seq": 3})
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"type": "exec"}), msgpack.packb({"seq": 1})):
        with pytest.raises(HandoffProtocolError):
            decode(bad)


@pytest.mark.parametrize(
    "endpoint",
    ["ipc:///run/hotswap/handoff.sock", "tcp://127.0.0.1:5555", "tcp://127.3.0.1:0", "tcp://[::1]:1"],
)
def test_local_endpoints_accepted(endpoint: str) -> None:
    check_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint", ["tcp://0.0.0.0:5555", "tcp://10.0.0.4:1", "tcp://*:5", "udp://127.0.0.1:1", "ipc://"]
)
def test_remote_endpoints_refused(endpoint: str) -> None:
    with pytest.raises(ValueError):
        check_endpoint(endpoint)
