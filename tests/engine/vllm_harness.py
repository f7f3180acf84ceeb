"""Running vllm_launcher in tests: start/stop, the agent's side of an update, greedy completions.

Helpers only (no fixtures), shared by test_vllm_launcher.py, test_vllm_tp.py and test_vllm_quantized.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hotswap_api.policy import RequestPolicy
from hotswap_engine import launcher_client
from hotswap_engine.handoff import HandoffSender, create_slots
from hotswap_testing.handoff_push import pack_naive, push_tensors, send_bucket
from hotswap_testing.package_metadata import write_dist_info
from hotswap_testing.tiny_model import weight_files
from hotswap_testing.waiting import wait_for
from safetensors.torch import load_file

PROMPTS = ["The quick brown fox", "Weights move from", "Once upon a time"]
MAX_TOKENS = 12
ENGINE_ARGS = [
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(32 << 20),
    "--max-model-len",
    "256",
    "--seed",
    "0",
    "--served-model-name",
    "tiny",
]
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600

Tensors = Sequence[tuple[str, torch.Tensor]]


@functools.cache
def _dist_info_dir() -> str:
    """This checkout's package metadata (its vLLM plugin entry point) for the engine processes."""
    return str(write_dist_info(Path(tempfile.mkdtemp(prefix="hotswap-dist-info-"))))


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    source = [str(REPO / p) for p in ("api", "engine", "operator", "cluster", "testing")]
    env.update(
        PYTHONPATH=os.pathsep.join([_dist_info_dir(), *source]),
        HF_HUB_OFFLINE="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # do not pin the shared machine's cores
        OMP_NUM_THREADS="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # for the offline reference engine
    )
    env.pop("VLLM_SERVER_DEV_MODE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Launcher:
    proc: subprocess.Popen[bytes]
    url: str
    control: str
    log: Path
    workdir: Path
    base_texts: list[str] = field(default_factory=list)
    base_extra: dict[str, str] = field(default_factory=dict)  # more answers of the base version


def start_launcher(model_dir: Path, workdir: Path, extra_args: Sequence[str] = ()) -> Launcher:
    port = free_port()
    log = workdir / "launcher.log"
    control = str(workdir / "run" / "control.sock")
    cmd = [
        sys.executable,
        "-m",
        "hotswap_engine.inference.vllm_launcher",
        "--control-socket",
        control,
        str(model_dir),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *ENGINE_ARGS, *extra_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True
        )
    return Launcher(proc, f"http://127.0.0.1:{port}", control, log, workdir)


def wait_ready(h: Launcher) -> None:
    def ready() -> bool:
        if h.proc.poll() is not None:
            raise AssertionError(f"launcher exited {h.proc.returncode}:\n{h.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{h.url}/health", timeout=2):
                pass
        except OSError:
            return False
        return Path(h.control).exists()

    wait_for(ready, START_TIMEOUT_S, "the launcher ready", lambda: h.log.read_text()[-4000:], interval=0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group start_launcher created (engine core included)
            proc.wait(10)


def reference_completions(model_dir: Path, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy completions of a fresh (offline, single-process) engine on `model_dir`."""
    out = subprocess.run(
        [sys.executable, "-m", "hotswap_testing.tiny_model", str(model_dir), "--complete"]
        + [a for p in prompts for a in ("--prompt", p)]
        + ["--max-tokens", str(max_tokens)],
        env=engine_env(),
        capture_output=True,
        timeout=START_TIMEOUT_S,
    )
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("HOTSWAP_COMPLETIONS ")]
    assert lines, out.stderr.decode()[-3000:]
    texts: list[str] = json.loads(lines[-1].removeprefix("HOTSWAP_COMPLETIONS "))
    return texts


def load_tensors(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    tensors: list[tuple[str, torch.Tensor]] = []
    for f in weight_files(model_dir):
        tensors += sorted(load_file(f).items())
    return tensors


def completion(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        text: str = json.load(resp)["choices"][0]["text"]
        return text


def texts(launcher: Launcher) -> list[str]:
    return [completion(launcher.url, p) for p in PROMPTS]


class Pusher:
    """The agent's side of one update: a sender and its slots, pushing from a thread.
    `workers`: receivers this sender serves (TP ranks sharing CPU slots). `tag` names the socket."""

    def __init__(
        self,
        workdir: Path,
        workers: int = 1,
        tag: str = "",
        slot_bytes: int = 96 << 10,
        abort_after: int | None = None,
    ) -> None:
        self.abort_after = abort_after  # abort after this many buckets instead of finishing
        self.shm = workdir / "shm"
        self.shm.mkdir(exist_ok=True)
        self.sender = HandoffSender(f"ipc://{workdir}/handoff{tag}.sock", workers, timeout=30)
        self.slots = create_slots(2, slot_bytes, torch.device("cpu"), self.shm)
        self.error: BaseException | None = None
        self.buckets = 0

    def push(self, version: str, tensors: Tensors, abort_after: int | None = None) -> None:
        if abort_after is None:
            abort_after = self.abort_after
        try:
            if abort_after is None:
                self.buckets = push_tensors(self.sender, version, self.slots, tensors)
                return
            size = self.slots[0].nbytes
            buckets = pack_naive(tensors, size - size % 64)
            assert len(buckets) > abort_after + 1
            self.sender.begin(version, self.slots)
            for i, bucket in enumerate(buckets[:abort_after]):
                index = i % len(self.slots)
                self.sender.wait_slot_free(index)
                send_bucket(self.sender, self.slots[index], index, bucket)
            self.sender.wait_slot_free(0)
            self.sender.abort("trainer cancelled")
        except BaseException as e:
            self.error = e
            self.sender.abort(f"pusher failed: {e}")

    def close(self) -> None:
        self.sender.close()
        for s in self.slots:
            s.close()


async def apply(
    launcher: Launcher,
    model: Path | Tensors | None,
    version: str,
    policy: RequestPolicy = RequestPolicy.KEEP,
    *,
    abort_after: int | None = None,
    timeout: float = 60,
    pushers: Sequence[Pusher] | None = None,
    endpoint: str | None = None,
    digests: bool = False,
) -> tuple[launcher_client.ApplyResult, list[Pusher]]:
    """POST /apply while `pushers` (default: one sender for one worker) push `model` from threads."""
    pushers = list(pushers) if pushers is not None else [Pusher(launcher.workdir)]
    threads = []
    try:
        if model is not None:
            tensors = load_tensors(model) if isinstance(model, Path) else model
            for p in pushers:
                threads.append(threading.Thread(target=p.push, args=(version, tensors, abort_after)))
                threads[-1].start()
        target = endpoint or pushers[0].sender.endpoint
        result = await launcher_client.apply(
            launcher.control, target, version, policy, timeout, digests=digests
        )
        for t in threads:
            await asyncio.to_thread(t.join, 60)
    finally:
        for p in pushers:
            p.close()
    return result, pushers
