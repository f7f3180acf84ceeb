"""Helpers of the end-to-end tests: the checkpoint folder, the operator process, the pool's spec and the
cluster calls the tests make (fixtures in conftest.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hotswap_cluster.diagnostics import describe_namespace
from hotswap_cluster.waiting import wait_for
from kubernetes import client

# pods.py (the engine tests' helpers: greedy completions through the OpenAI API and the reference
# engine) is shared, not copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from pods import pod_env, reference_completions

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
GROUP, VERSION = "hotswap.dev", "v1alpha1"
POOL = "chat"
MOUNT = "/checkpoints"
# The test hook that corrupts one pod's received bytes (hotswap_testing.corrupt_received): its file
# lies in the checkpoint folder, which every pod mounts; absent, the hook does nothing.
CORRUPT_HOOK_FILE = "test-hooks/corrupt-received.json"
VLLM_PORT = 8000
AGENT_PORT = 8600


def log(msg: str) -> None:
    """Progress and timings on the terminal (run with -s to see them live)."""
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- CRDs and namespace ------------------------------------------------------------------------------


# ---- checkpoints and reference outputs ---------------------------------------------------------------


BUILD = """
import sys
from hotswap_testing.tiny_model import build_tiny_model, make_variant
root = sys.argv[1]
base = build_tiny_model(f"{root}/models/base", seed=0)
for seed, name in ((2, "v2"), (3, "v3")):
    make_variant(base, f"{root}/ckpts/{name}", seed=seed)
"""


def build_checkpoints(root: Path) -> None:
    """models/base (the tiny Qwen3) and its variants ckpts/v2, ckpts/v3, in one child process (torch
    stays out of the test process; one import of torch and transformers instead of three)."""
    cmd = [sys.executable, "-c", BUILD, str(root)]
    done = subprocess.run(cmd, env=pod_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def write_mismatched(base: Path, out: Path) -> str:
    """A safetensors checkpoint with the base's tensor names and dtypes, one of them with another
    shape: what a checkpoint of a different model looks like to the agent. Returns that tensor."""
    raw = (base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    names = sorted(header)
    wrong = next(k for k in names if len(header[k]["shape"]) == 2)
    offset = 0
    out_header: dict[str, Any] = {}
    for k in names:
        shape = list(header[k]["shape"])
        if k == wrong:
            shape[0] += 8
        size = 2 if header[k]["dtype"] in ("BF16", "F16") else 4
        nbytes = size
        for d in shape:
            nbytes *= d
        out_header[k] = {
            "dtype": header[k]["dtype"],
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(out_header).encode()
    blob += b" " * (-len(blob) % 8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return wrong


class Checkpoints:
    """The checkpoint volume's content and the greedy output of a fresh engine on each checkpoint
    (computed in the background, one reference engine at a time, cached)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._refs: dict[str, Future[list[str]]] = {}

    def path(self, rel: str) -> Path:
        return self.root / rel

    def reference(self, rel: str) -> Future[list[str]]:
        if rel not in self._refs:
            self._refs[rel] = self._pool.submit(reference_completions, self.path(rel))
        return self._refs[rel]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---- the operator process ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """`python -m hotswap_operator` for one namespace; can be killed and started again."""

    def __init__(self, kubeconfig: str, namespace: str, logdir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics = f"127.0.0.1:{free_port()}"

    @property
    def log_path(self) -> Path:
        return self.logdir / f"operator-{self.starts}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=f"{ROOT}/api:{ROOT}/engine:{ROOT}/operator")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hotswap_operator",
                f"--kubeconfig={self.kubeconfig}",
                f"--namespace={self.namespace}",
                f"--lease-namespace={self.namespace}",
                f"--identity=e2e-{self.starts}",
                "--lease-duration=3",
                # Rollouts move on events (watches, agents' long-polls): with the safety-net resync
                # at 10 minutes, a rollout that completes proves that nothing waits on a timer.
                "--active-requeue=600",
                "--idle-requeue=600",
                f"--metrics={self.metrics}",
            ],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# ---- the pool ----------------------------------------------------------------------------------------


def pool_body(checkpoint_dir: Path, replicas: int = 2) -> dict[str, Any]:
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": POOL},
        "spec": {
            "replicas": replicas,
            "model": {"path": "models/base", "servedModelName": "tiny"},
            "checkpointVolume": {"source": {"hostPath": {"path": str(checkpoint_dir)}}, "mountPath": MOUNT},
            "engine": {"device": "CPU", "port": AGENT_PORT, "transport": {"collectiveTimeoutSeconds": 30}},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm-cpu",
                            "args": [
                                "--host=$(POD_IP)",
                                f"--port={VLLM_PORT}",
                                "--enforce-eager",
                                "--kv-cache-memory-bytes=33554432",
                                "--max-model-len=256",
                                "--seed=0",
                                # the worker runs in the engine-core process: 2 processes per engine
                                "--distributed-executor-backend=uni",
                            ],
                            "env": [
                                pod_ip,
                                {"name": "VLLM_HOST_IP", "value": "$(POD_IP)"},
                                {"name": "HF_HUB_OFFLINE", "value": "1"},
                                {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"},
                                {"name": "OMP_NUM_THREADS", "value": "1"},
                                {"name": "VLLM_LOGGING_LEVEL", "value": "WARNING"},
                                {"name": "PYTHONUNBUFFERED", "value": "1"},
                                {
                                    "name": "HOTSWAP_TEST_CORRUPT_RECEIVED",
                                    "value": f"hotswap_testing.corrupt_received:{MOUNT}/{CORRUPT_HOOK_FILE}",
                                },
                            ],
                            "ports": [{"name": "http", "containerPort": VLLM_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": VLLM_PORT},
                                "periodSeconds": 2,
                            },
                        }
                    ],
                }
            },
        },
    }


class Cluster:
    """The calls the tests make, on one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, kubeconfig: str, kubectl_bin: Path) -> None:
        self.kubectl_bin = kubectl_bin
        self.api = api
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        out: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        return dict(out)

    def pool(self) -> dict[str, Any]:
        return self.get("inferencepools", POOL)

    def wv(self, version: str) -> dict[str, Any]:
        return self.get("weightversions", f"{POOL}-{version}")

    def create_wv(self, version: str, source: str, timeout: str = "10m") -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WeightVersion",
            "metadata": {"name": f"{POOL}-{version}"},
            "spec": {
                "poolRef": {"name": POOL},
                "version": version,
                "source": {"path": source},
                "timeout": timeout,
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "weightversions", body)

    def patch_pool(self, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            "inferencepools",
            POOL,
            patch,
            _content_type="application/merge-patch+json",
        )

    def pods(self) -> list[Any]:
        pods: Any = self.core.list_namespaced_pod(self.namespace, label_selector=f"hotswap.dev/pool={POOL}")
        return [p for p in pods.items if p.metadata.deletion_timestamp is None]

    def token(self) -> str:
        secret: Any = self.core.read_namespaced_secret(f"{POOL}-agent-token", self.namespace)
        return base64.b64decode(secret.data["token"]).decode()

    def agent_status(self, pod: Any, token: str | None = None) -> dict[str, Any] | None:
        """The pod's agent, asked directly (not through the operator's view of it). With a `token`
        read before, no apiserver is needed (the fault suite asks while the apiserver is stopped)."""
        req = urllib.request.Request(f"http://{pod.status.pod_ip}:{AGENT_PORT}/v1/status")
        req.add_header("Authorization", f"Bearer {token or self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                out: dict[str, Any] = json.loads(r.read())
                return out
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait(
        self, check: Callable[[], Any], timeout: float, what: str, op: OperatorProcess | None = None
    ) -> Any:
        def explain() -> str:
            text = describe_namespace(self.api, self.namespace)
            if op is not None:
                text += f"\n----- operator log\n{op.tail()}"
            return text

        return wait_for(check, timeout, what, explain)

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.kubectl_bin), "-n", self.namespace, *args],
            env=dict(os.environ, KUBECONFIG=self.kubeconfig),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return None
