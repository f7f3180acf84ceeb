"""The agent's HTTP API fuzzed against its own OpenAPI document (schemathesis), on a real agent.

One pod on loopback: the plain launcher (`hotswap_testing.plain_launcher`: the launcher's control
socket in front of a plain receiver, no vLLM) and the real agent (`python -m hotswap_engine.agent
--device cpu`, one rank worker). Before fuzzing it is brought to serve a version of its own
(staged and applied through the API), so "the served version is unchanged" means something.

Schemathesis reads the document from the agent itself (`GET /openapi.json`) and runs its example,
coverage (boundary and negative values) and fuzzing phases with the bearer token, bounded in
examples and time. Checks: no 5xx; every status, content type and body as documented; negative
(schema-violating) input refused with a 4xx. Afterwards the agent is healthy, ready and serves
the same version. Addresses in generated update requests are rewritten to a closed loopback port
(`hotswap_testing.agent_fuzz_hooks`): nothing leaves the machine.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hotswap_engine.agent import openapi
from hotswap_testing.checkpoints import random_filler, save_sharded
from hotswap_testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "fuzz-token"
HOST = "127.0.0.1"
POD = "fuzz-pod"
SERVED = "v1"
# A small checkpoint: staging and the one real update take a fraction of a second.
DEFS = [
    ("a.weight", "BF16", (64, 32)),
    ("b.bias", "F32", (7,)),
    ("c.ids", "I64", (5, 3)),
    ("d.empty", "F32", (0, 4)),
]
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",
    ]
)
MAX_EXAMPLES = 25  # per operation and phase
MAX_TIME_S = 30  # schemathesis' own budget for the whole run (fuzzing repeats until it is spent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class FuzzPod:
    workdir: Path
    root: Path
    port: int = field(default_factory=free_port)
    max_status_wait: float = 1.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def control(self) -> Path:
        return self.workdir / "control.sock"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("api", "engine", "testing")),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            HOTSWAP_AGENT_TOKEN=TOKEN,
        )
        base = self.root / "base"
        self._spawn(
            "launcher",
            [
                "-m",
                "hotswap_testing.plain_launcher",
                "--control-socket",
                str(self.control),
                "--base",
                str(base),
            ],
            env,
        )
        self._spawn(
            "agent",
            [
                *("-m", "hotswap_engine.agent", "--pod-name", POD, "--host", HOST, "--port", str(self.port)),
                *("--base-checkpoint", str(base), "--allowed-root", str(self.root)),
                *("--control-socket", str(self.control), "--device", "cpu"),
                *("--handoff-endpoint", f"ipc://{self.workdir / 'handoff.sock'}"),
                *("--shm-dir", str(self.workdir / "shm"), "--collective-timeout", "20"),
                # Long-polls the fuzzer opens (a matching wait_for_change_after) end within a second.
                *("--max-status-wait", str(self.max_status_wait)),
            ],
            env,
        )

    def _spawn(self, what: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.workdir / f"{what}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[what] = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )

    def logs(self, lines: int = 40) -> str:
        out = []
        for what in self.procs:
            text = (self.workdir / f"{what}.log").read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {what} ---\n" + "\n".join(text))
        return "\n".join(out)

    def alive(self) -> None:
        for what, p in self.procs.items():
            assert p.poll() is None, f"the {what} exited with {p.returncode}\n{self.logs()}"

    def api(self, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get_content_type()
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get_content_type()
        return status, json.loads(raw) if raw and ctype == "application/json" else raw.decode()

    def up(self) -> bool:
        self.alive()
        try:
            return self.api("GET", "/healthz", token=None) == (200, "ok") and self.control.exists()
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        code, body = self.api("GET", "/v1/status")
        assert code == 200, body
        return dict(body)

    def settled(self) -> dict[str, Any] | None:
        """The status once no update runs (fuzzed updates fail fast: their peers are closed ports)."""
        self.alive()
        st = self.status()
        running = st["update"] is not None and st["update"]["stage"] not in ("Complete", "Failed")
        return None if running else st

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzPod]:
    # A short directory: unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="hs-fuzz-"))
    root = tmp_path_factory.mktemp("ckpts")
    for seed, name in enumerate(("base", SERVED)):
        save_sharded(root / name, DEFS, random_filler(seed), shards=1)
    (workdir / "shm").mkdir()
    p = FuzzPod(workdir, root)
    p.start()
    try:
        wait_for(p.up, 120, "agent and launcher not up")
        code, body = p.api("POST", "/v1/stage", {"version": SERVED, "source": {"path": str(root / SERVED)}})
        assert code == 201, body
        group = {
            "members": [{"rank": 0, "pod": POD, "address": HOST, "part": None}],
            "master_addr": HOST,
            "master_port": free_port(),
        }
        code, body = p.api("POST", "/v1/updates", {"version": SERVED, "rank": 0, "group": group})
        assert code == 202, body
        st = wait_for(p.settled, 60, "the first update did not finish")
        assert st["serving_version"] == SERVED and st["ready"], f"{st}\n{p.logs()}"
        yield p
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(pod: FuzzPod, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        SCHEMATHESIS_HOOKS="hotswap_testing.agent_fuzz_hooks",
        PYTHONPATH=os.pathsep.join([str(REPO / "testing"), env.get("PYTHONPATH", "")]),
    )
    cmd = [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{pod.url}{openapi.OPENAPI_PATH}",
        *("--header", f"Authorization: Bearer {TOKEN}"),
        *("--checks", CHECKS),
        *("--phases", "examples,coverage,fuzzing"),
        *("--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_TIME_S)),
        *("--workers", "1", "--seed", "15", "--generation-database", "none"),
        *("--request-timeout", "20", "--suppress-health-check", "all"),
        *("--no-color", "--output-truncate", "false"),
    ]
    t0 = time.monotonic()
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=MAX_TIME_S + 60)
    took = time.monotonic() - t0
    report = run.stdout[-20000:] + run.stderr[-5000:]
    print(f"schemathesis ({took:.0f}s):\n{report}")  # shown with -rP
    assert run.returncode == 0, f"schemathesis failed after {took:.0f}s:\n{report}\n{pod.logs()}"
    assert "No issues found" in run.stdout or "passed" in run.stdout, report

    # The agent survived all of it: alive, healthy, ready, serving the version it served before.
    st = wait_for(pod.settled, 60, f"a fuzzed update still runs\n{pod.logs()}")
    assert pod.api("GET", "/healthz", token=None) == (200, "ok")
    assert st["serving_version"] == SERVED, st
    assert st["ready"] and st["engine_up"], st
    assert pod.api("GET", "/readyz", token=None) == (200, "ready")


def test_served_document_is_the_generated_one(pod: FuzzPod) -> None:
    code, doc = pod.api("GET", openapi.OPENAPI_PATH, token=None)
    assert code == 200
    assert doc == openapi.generate()


def test_every_guarded_route_refuses_a_missing_or_wrong_token(pod: FuzzPod) -> None:
    for route in openapi.ROUTES:
        path = route.path.replace("{version}", SERVED).replace("{id}", "x")
        for token in (None, "wrong", ""):
            code, body = pod.api(route.method.upper(), path, token=token)
            if route.auth:
                assert (code, body["error"]) == (401, "Unauthorized"), (route.path, token, body)
            else:
                assert code in route.replies, (route.path, code)


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/v1/nothing-here", 404, "NotFound"),
        ("PUT", "/v1/status", 405, "BadRequest"),
        ("DELETE", "/v1/staged/", 404, "NotFound"),
    ],
)
def test_aiohttp_answers_are_error_bodies(
    pod: FuzzPod, method: str, path: str, status: int, error: str
) -> None:
    code, body = pod.api(method, path)
    assert (code, body["error"]) == (status, error), body


def test_body_larger_than_the_limit_is_a_413_error_body(pod: FuzzPod) -> None:
    big = {"version": "x", "source": {"path": "a" * (2 << 20)}}
    code, body = pod.api("POST", "/v1/stage", big)
    assert (code, body["error"]) == (413, "BadRequest"), body


def test_sigterm_ends_the_agent_promptly_while_a_long_poll_waits(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A terminating pod's agent exits on SIGTERM within seconds, also while the operator holds a
    status long-poll open (it is always holding one). Before, aiohttp waited up to 60 s for that
    request, and the pod kept serving its memory to peer-to-peer readers until the kubelet's SIGKILL."""
    workdir = Path(tempfile.mkdtemp(prefix="hs-term-"))
    root = tmp_path_factory.mktemp("ckpts")
    save_sharded(root / "base", DEFS, random_filler(0), shards=1)
    (workdir / "shm").mkdir()
    p = FuzzPod(workdir, root, max_status_wait=60)
    p.start()
    try:
        wait_for(p.up, 120, "agent and launcher not up")
        seq = p.status()["sequence"]
        conn = http.client.HTTPConnection(HOST, p.port, timeout=90)
        conn.request(
            "GET",
            f"/v1/status?wait_for_change_after={seq}&timeout_seconds=60",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        # An ordering barrier, not a wait: the long-poll was sent first on an open connection, so by
        # the time the agent answers this request its handler is holding the long-poll.
        assert p.api("GET", "/healthz", token=None) == (200, "ok")
        agent = p.procs["agent"]
        assert agent.poll() is None, p.logs()
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent still runs 15 s after SIGTERM, with a long-poll open\n{p.logs()}")
        took = time.monotonic() - t0
        assert code == 0, f"the agent exited with {code} on SIGTERM\n{p.logs()}"
        # The long-poll was answered (the status as it is), not left hanging.
        try:
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            assert json.loads(reply.read())["pod"] == POD
        except (ConnectionError, http.client.HTTPException) as e:
            pytest.fail(f"the open long-poll got no answer before the agent exited ({e!r}) after {took:.1f}s")
        finally:
            conn.close()
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
