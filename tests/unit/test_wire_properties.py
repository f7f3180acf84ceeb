"""Property-based tests (hypothesis) of every decoder in front of a private channel: whatever the
bytes, a decoder answers a typed message or its own typed error, never anything else.

- the rank-worker channel (`agent.ranks`: length-prefixed msgpack frames on a unix socketpair), its
  socket reader, and the worker's serve loop, which refuses a malformed frame and keeps serving;
- the launcher's control channel (`hotswap_api.launcher.ApplyRequest`: the POST /apply body);
- the agent API's request bodies (`protocol` models, parsed strictly as `api._body` does).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hotswap_api import protocol
from hotswap_api.launcher import MAX_APPLY_TIMEOUT_S, ApplyRequest, BadApplyRequest
from hotswap_api.policy import RequestPolicy
from hotswap_api.rank_messages import Message
from hotswap_engine.agent import ranks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))

OPS = ["map", "unmap", "group", "prepare", "broadcast", "discard", "exit", "hello", "progress", "result"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack encodes
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
# What msgpack can carry: nested maps and arrays of scalars (any scalar as a map key).
packable = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(scalars, inner, max_size=5),
    max_leaves=25,
)


def packed(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


# A message of a real op with fields drawn from anywhere: mostly malformed, sometimes valid.
op_messages = st.builds(
    lambda op, fields: {**fields, "op": op},
    st.sampled_from(OPS),
    st.dictionaries(
        st.sampled_from(
            [
                "buffers",
                "ids",
                "members",
                "master_addr",
                "master_port",
                "backend",
                "rank",
                "version",
                "staged",
                "pod_parts",
                "local",
                "bucket_bytes",
                "slots",
                "ok",
                "error",
                "bytes",
                "pid",
            ]
        ),
        packable,
        max_size=6,
    ),
)


# ---- rank-worker channel -----------------------------------------------------------------------


def check_decode(body: bytes) -> dict[str, Any] | None:
    try:
        message = ranks.decode(body)
    except ranks.ProtocolError:
        return None
    assert message["op"] in OPS
    # A message that decodes is the validated form of itself: decoding it again changes nothing.
    assert ranks.decode(ranks.encode(message)[ranks.FRAME_HEADER.size :]) == message
    return message


@FAST
@given(st.binary(max_size=256))
def test_any_bytes_decode_to_a_message_or_a_protocol_error(body: bytes) -> None:
    check_decode(body)


@FAST
@given(packable)
def test_any_msgpack_value_decodes_to_a_message_or_a_protocol_error(value: Any) -> None:
    check_decode(packed(value))


@FAST
@given(op_messages)
def test_messages_of_real_ops_with_arbitrary_fields_are_checked(message: dict[str, Any]) -> None:
    check_decode(packed(message))


@FAST
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=63))
def test_truncated_or_extended_valid_frames_are_refused(noise: bytes, cut: int) -> None:
    body = ranks.encode({"op": "progress", "bytes": 5})[ranks.FRAME_HEADER.size :]
    if cut < len(body):
        check_decode(body[:cut])
    if noise:
        assert check_decode(body + noise) is None  # trailing bytes: not one msgpack value


def valid_messages() -> st.SearchStrategy[dict[str, Any]]:
    ids = st.integers(min_value=0, max_value=(1 << 63) - 1)
    return st.one_of(
        st.builds(
            lambda b: {"op": "map", "buffers": b},
            st.lists(st.fixed_dictionaries({"id": ids, "nbytes": ids, "capacity": ids}), max_size=8),
        ),
        st.builds(lambda i: {"op": "unmap", "ids": i}, st.lists(ids, max_size=8)),
        st.builds(
            lambda op, m, a, port, be, r: {
                "op": op,
                "members": m,
                "master_addr": a,
                "master_port": port,
                "backend": be,
                "rank": r,
            },
            st.sampled_from(["group", "prepare"]),
            st.lists(st.text(max_size=10), min_size=1, max_size=4),
            st.text(max_size=15),
            st.integers(min_value=1, max_value=65535),
            st.sampled_from(["nccl", "gloo"]),
            ids,
        ),
        st.builds(lambda n: {"op": "progress", "bytes": n}, ids),
        st.builds(
            lambda ok, err, ex: {"op": "result", "ok": ok, "error": err, "exiting": ex},
            st.booleans(),
            st.none() | st.text(max_size=30),
            st.booleans(),
        ),
        st.just({"op": "discard"}),
        st.just({"op": "exit"}),
    )


@FAST
@given(valid_messages())
def test_valid_messages_round_trip(message: dict[str, Any]) -> None:
    got = check_decode(ranks.encode(message)[ranks.FRAME_HEADER.size :])
    assert got is not None, message
    for key, value in message.items():
        want = tuple(value) if isinstance(value, list) else value
        assert got[key] == want or [dict(x) for x in got[key]] == value, key


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.settimeout(10)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@FAST
@given(stream=st.lists(st.binary(max_size=64), max_size=6))
def test_the_socket_reader_answers_messages_or_typed_errors_for_any_stream(stream: list[bytes]) -> None:
    """Arbitrary bytes on the channel (then the peer closes): every read is a message, a
    ProtocolError (a whole bad frame: the next read is in step) or EOFError; FrameTooLarge ends it."""
    a, b = socket.socketpair()
    b.settimeout(10)
    try:
        a.sendall(b"".join(stream))
        a.close()
        for _ in range(1000):
            try:
                msg, fds = ranks.recv_message(b)
            except EOFError:
                return
            except ranks.FrameTooLarge:
                return
            except ranks.ProtocolError:
                continue
            assert msg["op"] in OPS and fds == []
        pytest.fail("the reader did not reach the end of a finite stream")
    finally:
        b.close()


class FakeGroups:
    needs_exit = False


class FakeSender:
    endpoint = "ipc:///nowhere"


class FakeWorker:
    """What `rank_worker.serve` uses of a RankWorker, without a device or a hand-off socket."""

    local_rank = 0
    device = "cpu"

    def __init__(self) -> None:
        self.groups = FakeGroups()
        self.sender = FakeSender()
        self.handled: list[str] = []

    def handle(self, msg: Message, fds: list[int], sock: socket.socket) -> dict[str, Any]:
        self.handled.append(msg.op)  # typed: the worker gets the validated model, not a dict
        return {"ok": True}

    def _failed(self, error: str) -> dict[str, Any]:
        return {"ok": False, "error": f"rank worker 0: {error}", "exiting": False}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(bodies=st.lists(st.binary(max_size=48) | op_messages.map(packed), min_size=1, max_size=5))
def test_the_worker_refuses_malformed_frames_and_keeps_serving(bodies: list[bytes]) -> None:
    from hotswap_engine.agent import rank_worker

    agent, worker_end = socket.socketpair()
    agent.settimeout(20)
    worker = FakeWorker()
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(rank_worker.serve(worker_end, worker)), daemon=True)
    thread.start()
    try:
        hello, _ = ranks.recv_message(agent)
        assert hello["op"] == "hello"
        for body in bodies:
            agent.sendall(ranks.FRAME_HEADER.pack(len(body)) + body)
            try:
                valid = ranks.decode(body)
            except ranks.ProtocolError:
                valid = None
            if valid is not None and valid["op"] == "exit":
                break
            answer, _ = ranks.recv_message(agent)
            assert answer["op"] == "result"
            if valid is None:
                assert not answer["ok"] and "refused" in answer["error"], answer
        else:
            ranks.send_message(agent, {"op": "discard"})
            answer, _ = ranks.recv_message(agent)
            assert answer["ok"] and worker.handled[-1] == "discard"  # still in step
            ranks.send_message(agent, {"op": "exit"})
        assert ranks.recv_message(agent)[0] == {"op": "result", "ok": True, **RESULT_DEFAULTS}
        thread.join(20)
        assert code == [0]
    finally:
        agent.close()
        worker_end.close()


RESULT_DEFAULTS = {"error": None, "exiting": False, "seconds": None, "restart": None, "stats": None}


def test_a_frame_announcing_too_much_closes_the_worker_channel_cleanly() -> None:
    from hotswap_engine.agent import rank_worker

    agent, worker_end = socket.socketpair()
    agent.settimeout(20)
    try:
        code: list[int] = []
        thread = threading.Thread(
            target=lambda: code.append(rank_worker.serve(worker_end, FakeWorker())), daemon=True
        )
        thread.start()
        ranks.recv_message(agent)  # hello
        agent.sendall(ranks.FRAME_HEADER.pack(ranks.MAX_FRAME_BYTES + 1))
        thread.join(20)
        assert code == [rank_worker.EXIT_PROTOCOL]
    finally:
        agent.close()
        worker_end.close()


# ---- the launcher's control channel ------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 1100), max_value=1 << 1100)
    | st.floats()
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
apply_bodies = st.fixed_dictionaries(
    {},
    optional={
        "endpoint": json_values | st.sampled_from(["ipc:///run/h.sock", "tcp://127.0.0.1:5555", "x"]),
        "version": json_values | st.sampled_from(["v1", "base", "a\nb"]),
        "policy": json_values | st.sampled_from(["Keep", "Wait", "Abort", "keep", "never"]),
        "timeout": json_values | st.sampled_from([1, 0.5, 0, -1, 1e400, 10**400, MAX_APPLY_TIMEOUT_S + 1]),
        "extra": json_values,
    },
)


def check_apply(raw: bytes) -> ApplyRequest | None:
    try:
        req = ApplyRequest.from_json(raw)
    except BadApplyRequest:
        return None
    assert req.endpoint.startswith(("ipc://", "tcp://")) and req.version
    assert req.policy in set(RequestPolicy)
    assert math.isfinite(req.timeout) and 0 < req.timeout <= MAX_APPLY_TIMEOUT_S
    return req


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_are_an_apply_request_or_a_bad_request(raw: bytes) -> None:
    check_apply(raw)


@FAST
@given(json_values | apply_bodies)
def test_any_json_body_is_an_apply_request_or_a_bad_request(body: Any) -> None:
    check_apply(json.dumps(body).encode())  # json.dumps writes NaN/Infinity: refused too


@pytest.mark.parametrize(
    "raw",
    [
        b'{"endpoint": "ipc:///x", "version": "v", "timeout": ' + b"9" * 400 + b"}",  # int beyond float
        b'{"endpoint": "ipc:///x", "version": "v", "timeout": NaN}',
        b'{"endpoint": "ipc:///x", "version": "v", "timeout": Infinity}',
        b'{"endpoint": "ipc:///x", "version": "v", "timeout": 1e999}',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser recurses
        b'{"endpoint": "ipc:///x", "version": "v\\u0000"}',
        b'{"endpoint": "inproc://x", "version": "v"}',
        b'{"endpoint": "ipc:///x", "version": "v", "timeout": 172800}',
        b"\xff\xfe",
        b"",
    ],
)
def test_apply_bodies_that_once_escaped_as_500s_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(BadApplyRequest):
        ApplyRequest.from_json(raw)


def test_a_valid_apply_request() -> None:
    raw = b'{"endpoint": "ipc:///x", "version": "v1", "policy": "Wait", "timeout": 2}'
    req = ApplyRequest.from_json(raw)
    assert req == ApplyRequest(endpoint="ipc:///x", version="v1", policy=RequestPolicy.WAIT, timeout=2.0)
    assert req.policy.vllm_mode == "wait" and isinstance(req.timeout, float)


def test_apply_request_policies_are_the_crds_spelling() -> None:
    # The same values as InferencePool.spec.updatePolicy.requests: vLLM's lowercase names are refused.
    with pytest.raises(BadApplyRequest, match="policy"):
        ApplyRequest.from_json(b'{"endpoint": "ipc:///x", "version": "v1", "policy": "keep"}')


# ---- the agent API's bodies --------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_agent_bodies_are_models_or_validation_errors(raw: bytes) -> None:
    for model in (protocol.StageRequest, protocol.UpdateRequest):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(raw, strict=True)


@pytest.mark.parametrize(
    "body",
    [
        {"version": "v", "source": {"path": "x"}, "part": {"index": "0", "count": 1}},
        {"version": "v", "mode": "P2P", "peers": [], "timeout_seconds": "5"},
        {"version": "v", "rank": 0, "group": None, "timeout_seconds": 1e999},
        {"version": "v", "memory_budget_bytes": 1 << 70, "rank": 0},
    ],
)
def test_agent_bodies_take_only_the_documented_types(body: dict[str, Any]) -> None:
    model = protocol.StageRequest if "source" in body else protocol.UpdateRequest
    with pytest.raises(ValidationError):
        model.model_validate_json(json.dumps(body), strict=True)
