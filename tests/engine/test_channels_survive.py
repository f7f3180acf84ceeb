"""The private channels refuse malformed input and their processes survive it: a real plain launcher
(`hotswap_testing.plain_launcher`, the launcher's `ControlServer`) under a burst of malformed
requests on its control socket, and a real rank worker process under malformed frames.
The decoders themselves are property-tested in tests/unit/test_wire_properties.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotswap_engine.agent import ranks
from hotswap_testing.checkpoints import random_filler, save_sharded
from hotswap_testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
DEFS = [("a.weight", "BF16", (16, 8)), ("b.bias", "F32", (7,))]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("api", "engine", "testing")), PYTHONUNBUFFERED="1"
    )
    return e


def raw_request(path: Path, data: bytes, *, half_close: bool = False, timeout: float = 20.0) -> bytes:
    """Send raw bytes on the unix socket; everything the server answers before it closes (with
    `half_close`, our side says it is done writing: for requests that announce more than they send)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def http(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: hotswap\r\nConnection: close\r\n{headers}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def body_of(answer: bytes) -> Any:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


@pytest.fixture(scope="module")
def launcher() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    work = Path(tempfile.mkdtemp(prefix="hs-chan-"))
    save_sharded(work / "base", DEFS, random_filler(0), shards=1)
    control = work / "control.sock"
    log = open(work / "launcher.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hotswap_testing.plain_launcher",
            "--control-socket",
            str(control),
            "--base",
            str(work / "base"),
        ],
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, (work / "launcher.log").read_text()
            return control.exists()

        wait_for(up, 120, "the plain launcher's control socket to appear")
        yield control, proc
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


APPLY_BODIES = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[1, 2]",
    b"null",
    b'{"endpoint": "ipc:///x", "version": "v", "timeout": ' + b"9" * 400 + b"}",
    b'{"endpoint": "ipc:///x", "version": "v", "timeout": NaN}',
    b'{"endpoint": "ipc:///x", "version": "v", "timeout": Infinity}',
    b'{"endpoint": "ipc:///x", "version": "v", "timeout": -1}',
    b'{"endpoint": "ipc:///x", "version": "v", "policy": ["keep"]}',
    b'{"endpoint": "nowhere", "version": "v"}',
    b'{"endpoint": "ipc:///x", "version": "v\\u0000"}',
    b'{"endpoint": "ipc:///x", "version": 7}',
    b'{"endpoint": "ipc:///x", "version": "v", "surprise": {}}',
    b"[" * 200_000 + b"]" * 200_000,
]


def test_launcher_refuses_a_burst_of_malformed_requests_and_stays_healthy(
    launcher: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    control, proc = launcher
    for body in APPLY_BODIES:
        answer = raw_request(control, http("POST", "/apply", body, "Content-Type: application/json\r\n"))
        assert status_of(answer) == 400, (body[:80], answer[:300])
        assert "bad request" in body_of(answer)["error"]
    # Below the application: not HTTP at all, broken framing, a body over the limit, wrong routes.
    for data, allowed, half_close in [
        (b"\x00\x01garbage\r\n\r\n", {0, 400}, True),
        (b"GET /healthz HTTP/9.9\r\n\r\n", {0, 400, 505}, True),
        (b"POST /apply HTTP/1.1\r\nContent-Length: -5\r\n\r\n", {0, 400}, True),
        (b"POST /apply HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", {0, 400}, True),
        (http("POST", "/apply", b"{" * (2 << 20)), {413}, False),
        (http("DELETE", "/apply"), {405}, False),
        (http("POST", "/healthz"), {405}, False),
        (http("GET", "/nothing"), {404}, False),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", {0, 400, 414}, True),
    ]:
        answer = raw_request(control, data, half_close=half_close)
        assert status_of(answer) in allowed, (data[:60], answer[:300])
    assert proc.poll() is None, "the launcher died"
    health = raw_request(control, http("GET", "/healthz"))
    assert status_of(health) == 200, health
    assert body_of(health) | {"last_error": None} == {
        "ok": True,
        "engine_alive": True,
        "paused": False,  # nothing malformed ever reached the engine
        "applying": False,
        "version": None,
        "weight_version": None,  # the plain engine is a vLLM 0.26 (no weight version)
        "last_error": None,
        "restarted_from": None,  # a first start: no version lost
    }


def test_a_rank_worker_refuses_malformed_frames_and_keeps_serving(tmp_path: Path) -> None:
    agent, child = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hotswap_engine.agent.rank_worker",
            "--fd",
            str(child.fileno()),
            "--local-rank",
            "0",
            "--device",
            "cpu",
            "--bind-host",
            "127.0.0.1",
            "--endpoint",
            f"ipc://{tmp_path}/h.sock",
            "--shm-dir",
            str(tmp_path),
        ],
        pass_fds=(child.fileno(),),
        env=env(),
    )
    child.close()
    agent.settimeout(120)  # importing torch on a busy machine
    try:
        assert ranks.recv_message(agent)[0]["op"] == "hello"
        agent.settimeout(30)
        bad = [
            b"",
            b"\xc1",
            b"\x92\x01\x02",  # an array, not a map
            ranks.encode({"op": "launch"})[4:],
            ranks.encode({"op": "unmap", "ids": ["1"]})[4:],
            ranks.encode({"op": "group", "members": [], "rank": -1})[4:],
            ranks.encode({"op": "broadcast", "version": "v"})[4:],
        ]
        for body in bad:
            agent.sendall(ranks.FRAME_HEADER.pack(len(body)) + body)
            answer, _ = ranks.recv_message(agent)
            assert answer["op"] == "result" and not answer["ok"], answer
            assert "refused" in str(answer["error"]), answer
        # A map whose fds do not match is refused by the handler; the fds are closed there.
        r, w = os.pipe()
        try:
            ranks.send_message(agent, {"op": "map", "buffers": []}, [r])
            answer, _ = ranks.recv_message(agent)
            assert not answer["ok"] and "fds" in str(answer["error"]), answer
        finally:
            os.close(r)
            os.close(w)
        ranks.send_message(agent, {"op": "discard"})
        assert ranks.recv_message(agent)[0]["ok"], "not in step after the refusals"
        assert proc.poll() is None
        # A header announcing more than a frame may hold: framing is lost, the worker leaves cleanly.
        agent.sendall(ranks.FRAME_HEADER.pack(ranks.MAX_FRAME_BYTES + 1))
        assert proc.wait(30) == 4
    finally:
        agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
