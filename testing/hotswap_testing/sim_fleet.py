"""A simulated fleet on the local cluster: pools whose pods run the agent STAND-IN (`sim_agent`) as
their engine container and a trivial inference container, for operator tests and scale runs.

The real operator builds the pods (its `engine_command`/`inference_command` settings name the
stand-in and `sleep`); the real apiserver, controller-manager and kubelet stand-in run them. Nothing
here is shipped.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from typing import Any

from hotswap_api import protocol

from hotswap_testing.sim_agent import COUNTERS_PATH, FAULTS_PATH, SimFault, SimFaults, SimTimes

GROUP, VERSION = "hotswap.dev", "v1alpha1"
# The inference container of a simulated pod: nothing talks to it, so it only has to run. `sh -c`
# takes the launcher's arguments the operator appends ($0, $1, ...) and ignores them; `sleep` costs
# no memory to speak of (hundreds of pods fit beside their stand-in agents).
INFERENCE_COMMAND = ("sh", "-c", "exec sleep infinity", "sim-inference")


def engine_command(times: SimTimes, model_bytes: int = 16 << 30) -> list[str]:
    """The operator's `engine_command` for a simulated fleet: the stand-in with its step times."""
    return [
        sys.executable,
        "-m",
        "hotswap_testing.sim_agent",
        f"--sim-stage-seconds={times.stage}",
        f"--sim-connect-seconds={times.connect}",
        f"--sim-transfer-seconds={times.transfer}",
        f"--sim-reload-seconds={times.reload}",
        f"--sim-p2p-seconds={times.p2p}",
        f"--sim-engine-start-seconds={times.engine_start}",
        f"--sim-model-bytes={model_bytes}",
    ]


def operator_commands(times: SimTimes) -> dict[str, list[str]]:
    """`OperatorSettings` keyword arguments (or, as JSON, its environment variables) for a simulated fleet."""
    return {"engine_command": engine_command(times), "inference_command": list(INFERENCE_COMMAND)}


def pool_body(name: str, replicas: int, history_limit: int = 10, max_attempts: int = 3) -> dict[str, Any]:
    """A pool of simulated pods (no readiness probe of its own: the operator's gate decides)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "versionHistoryLimit": history_limit,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "sim"}]}},
            "model": {"path": "models/base"},
            "checkpointVolume": {"source": {"hostPath": {"path": "/tmp"}}},
            "engine": {"device": "CPU"},
            "updatePolicy": {"maxAttempts": max_attempts},
        },
    }


def wv_body(pool: str, version: str, timeout: str | None = None) -> dict[str, Any]:
    source = {"path": f"ckpts/{version}"}
    spec: dict[str, Any] = {"poolRef": {"name": pool}, "version": version, "source": source}
    if timeout is not None:
        spec["timeout"] = timeout
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightVersion",
        "metadata": {"name": f"{pool}-{version}"},
        "spec": spec,
    }


def token_of(secret_data: dict[str, str]) -> str:
    """The pool's agent token from its Secret's `data`."""
    return base64.b64decode(secret_data["token"]).decode()


def _call(endpoint: str, token: str, path: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(
        endpoint.rstrip("/") + path,
        data=body,
        method="POST" if body is not None else "GET",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def inject(endpoint: str, token: str, *faults: SimFault) -> None:
    """Queue failures on one simulated agent (its test-only endpoint)."""
    _call(endpoint, token, FAULTS_PATH, SimFaults(faults=faults).model_dump_json().encode())


def counters(endpoint: str, token: str) -> dict[str, int]:
    """Requests the simulated agent served, by route."""
    out: dict[str, int] = _call(endpoint, token, COUNTERS_PATH)
    return out


def status(endpoint: str, token: str) -> protocol.AgentStatus:
    return protocol.AgentStatus.model_validate(_call(endpoint, token, f"{protocol.API_PREFIX}/status"))
