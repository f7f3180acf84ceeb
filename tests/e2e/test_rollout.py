"""Issue 4's acceptance, end to end: the operator process drives one InferencePool of real pods (vLLM
launcher + hotswap agent each) on the local cluster.

The tests share one pool (engines are expensive: the module's `pool` fixture creates it), but none
relies on another having run: each first waits until the pool is settled (no rollout in progress,
every replica Ready), sets the transfer throttle it needs, and reads what the pool serves now and what
that version's output must be (a fresh engine on its checkpoint). Any order works, any test alone
works; in file order no test repeats a rollout another already did (about the same pod starts).
  1. the pool becomes Available on the base checkpoint (2 replicas);
  2. v2 rolls out: greedy output equals a fresh engine on v2, statuses, labels, events, kubectl wait;
  3. sources that are missing or belong to another model fail, every replica keeps serving what it
     served, Ready;
  4. v4 applied while v3 rolls out (transfers throttled) supersedes v3 and ends at v4;
  5. the operator is killed during a rollout; started again, it resumes and completes it;
  6. scaling up by one: the new pod reads the current version peer-to-peer from the stable pods, which
     keep serving (and run no update); it stays not Ready until its agent serves that version;
  7. throttled, scaling up by one and deleting a source pod mid-transfer: the new pod still ends
     serving the current version (from the remaining holders), the replacement pod catches up too;
  8. one byte of one pod's received weights corrupted (a test hook): verification names that pod and
     tensor in the WeightVersion's status and an Event, the pod stays out of traffic while the other
     serves; the next clean version brings it back.
Tests 6 and 7 need a published version to catch up to: they publish one first when the pool still
serves the base checkpoint (only when run without the tests before them).
Greedy output is compared through the public OpenAI API (temperature 0, ignore_eos, fixed max_tokens).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from e2e_fleet import (
    CORRUPT_HOOK_FILE,
    GROUP,
    POOL,
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
from hotswap_testing.waiting import wait_for
from pods import generate

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.timeout(1200)]

TERMINAL = ("Complete", "Failed", "Superseded")
GATE = "hotswap.dev/weights-ready"


def outputs(pod: Any) -> list[str]:
    return generate(f"http://{pod.status.pod_ip}:{VLLM_PORT}")


@dataclass
class PoolStart:
    """What the module's pool looked like when it first had every replica Ready (test 1 checks it)."""

    available_s: float
    all_ready_s: float
    deployment_replicas: int
    pods: list[Any]
    agents: dict[str, dict[str, Any] | None]  # pod name -> its agent's /v1/status
    outputs: dict[str, list[str]]  # pod name -> greedy output

    @property
    def base(self) -> list[str]:
        """Greedy output on the base checkpoint (models/base), as the pool's first pod answered."""
        return self.outputs[self.pods[0].metadata.name]


@pytest.fixture(scope="module")
def pool(
    kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints, timings: dict[str, float]
) -> Iterator[PoolStart]:
    """The pool every test uses: created on the base checkpoint with 2 replicas, up to all Ready."""
    # Fresh engines on the variants, computed meanwhile in the background (one at a time).
    checkpoints.reference("ckpts/v2")
    checkpoints.reference("ckpts/v3")
    t0 = time.monotonic()
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, kube.namespace, "inferencepools", pool_body(checkpoints.root)
    )

    def available() -> bool:
        c = condition(kube.pool(), "Available")
        return c is not None and c["status"] == "True"

    kube.wait(available, 900, "pool Available", operator)
    timings["pool_available_s"] = available_s = time.monotonic() - t0
    kube.wait(lambda: kube.pool()["status"].get("readyReplicas") == 2, 600, "2 ready replicas", operator)
    timings["pool_all_ready_s"] = all_ready_s = time.monotonic() - t0
    log(f"pool Available after {available_s:.1f}s, all replicas ready after {all_ready_s:.1f}s")
    pods = kube.pods()
    yield PoolStart(
        available_s=available_s,
        all_ready_s=all_ready_s,
        deployment_replicas=kube.apps.read_namespaced_deployment(POOL, kube.namespace).spec.replicas,
        pods=pods,
        agents={p.metadata.name: kube.agent_status(p) for p in pods},
        outputs={p.metadata.name: outputs(p) for p in pods},
    )


# ---- the state a test starts from ------------------------------------------------------------------


def settle(kube: Cluster, op: OperatorProcess) -> int:
    """Waits until no version of the pool is in progress and every replica is Ready (whatever ran
    before); returns the number of replicas."""

    def settled() -> int | None:
        pool = kube.pool()  # the module's `pool` fixture made it: a test that uses settle() needs it
        want = int(pool["spec"]["replicas"])
        wvs = kube.custom.list_namespaced_custom_object(GROUP, VERSION, kube.namespace, "weightversions")
        busy = [w for w in wvs["items"] if (w.get("status") or {}).get("phase") not in TERMINAL]
        pods = kube.pods()
        ok = (
            not busy
            and len(pods) == want
            and all(is_ready(p) for p in pods)
            and (pool.get("status") or {}).get("readyReplicas") == want
        )
        return want if ok else None

    n: int = kube.wait(settled, 900, "the pool settled (no rollout in progress, every replica Ready)", op)
    return n


def throttle(kube: Cluster, bytes_per_second: int | None) -> None:
    """Caps the agents' transfers (staging reads, broadcast, peer-to-peer); None: no cap."""
    kube.patch_pool({"spec": {"engine": {"transport": {"maxBytesPerSecond": bytes_per_second}}}})


def serving(kube: Cluster) -> str:
    """The version the pool serves now ("base": none published yet)."""
    return str((kube.pool().get("status") or {}).get("currentVersion") or "base")


def expected_outputs(kube: Cluster, ckpts: Checkpoints, start: PoolStart, version: str) -> list[str]:
    """What a fresh engine on `version`'s checkpoint answers."""
    source = "models/base" if version == "base" else kube.wv(version)["spec"]["source"]["path"]
    return start.base if source == "models/base" else ckpts.reference(source).result(timeout=900)


def ensure_published(kube: Cluster, op: OperatorProcess, version: str) -> str:
    """The pool serves a published version (a new pod catches up only to one): the current one, or
    `version` (ckpts/v2) published and rolled out now when the pool still serves the base checkpoint."""
    current = serving(kube)
    if current != "base":
        return current
    log(f"the pool serves the base checkpoint: publishing {version} first")
    kube.create_wv(version, "ckpts/v2")
    wait_phase(kube, op, version, "Complete")
    return version


# ---- statuses, events, outputs -----------------------------------------------------------------------


def phase(kube: Cluster, version: str) -> str | None:
    st: dict[str, Any] = kube.wv(version).get("status") or {}
    return st.get("phase")


def wait_phase(kube: Cluster, op: OperatorProcess, version: str, want: str, timeout: float = 600) -> None:
    def check() -> bool:
        got = phase(kube, version)
        if got in TERMINAL and got != want:
            raise AssertionError(f"{version} ended {got}, not {want}: {kube.wv(version).get('status')}")
        return got == want

    kube.wait(check, timeout, f"WeightVersion {version} {want}", op)


def assert_pool_serves(kube: Cluster, version: str, expected: list[str], replicas: int) -> None:
    """Every pod: Ready, labelled `version`, its agent serving it, greedy output `expected`."""

    # The operator writes statuses before it relabels pods (one reconcile apart): labels follow.
    def labelled() -> bool:
        pods = kube.pods()
        return len(pods) == replicas and all(
            p.metadata.labels.get("hotswap.dev/weight-version") == version and is_ready(p) for p in pods
        )

    kube.wait(labelled, 60, f"{replicas} Ready pods labelled {version}")
    pods = kube.pods()
    assert len(pods) == replicas, [p.metadata.name for p in pods]
    for pod in pods:
        name = pod.metadata.name
        assert is_ready(pod), f"{name} not Ready: {pod.status.conditions}"
        assert pod.metadata.labels["hotswap.dev/weight-version"] == version, (name, pod.metadata.labels)
        agent = kube.agent_status(pod)
        assert agent is not None and agent["serving_version"] == (None if version == "base" else version), (
            name,
            agent,
        )
        assert outputs(pod) == expected, f"{name} output differs from a fresh engine on {version}"
    st = kube.pool()["status"]
    assert st["readyReplicas"] == replicas and st["replicas"] == replicas, st
    assert st.get("currentVersion") == (None if version == "base" else version), st


def events_of(kube: Cluster, kind: str, name: str) -> list[Any]:
    evs = kube.core.list_namespaced_event(kube.namespace).items
    return [e for e in evs if e.involved_object.kind == kind and e.involved_object.name == name]


def wait_events(
    kube: Cluster, kind: str, name: str, reasons: set[str], warning: bool = False, says: str = ""
) -> None:
    """Events come after the status they describe (the operator writes statuses first): wait."""

    def seen() -> bool:
        evs = [e for e in events_of(kube, kind, name) if says in (e.message or "")]
        return reasons <= {e.reason for e in evs if not warning or e.type == "Warning"}

    kube.wait(seen, 30, f"events {sorted(reasons)} on {kind} {name}" + (f" saying {says!r}" if says else ""))


def agents_updating(kube: Cluster, version: str) -> bool:
    """An agent reports a running update to `version` (its transfer is in progress)."""
    for pod in kube.pods():
        st = kube.agent_status(pod) or {}
        u = st.get("update") or {}
        if u.get("version") == version and u.get("stage") not in ("Complete", "Failed", None):
            return True
    return False


def model_bytes(ckpts: Checkpoints) -> int:
    return sum(f.stat().st_size for f in ckpts.path("models/base").glob("*.safetensors"))


def test_1_pool_becomes_available(
    kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints, pool: PoolStart
) -> None:
    """Fresh namespace -> a 2-replica pool on the base checkpoint, Available, both pods Ready (as the
    `pool` fixture saw it when it first was); and Available now, serving what it says it serves."""
    assert pool.deployment_replicas == 2
    assert len(pool.pods) == 2, [p.metadata.name for p in pool.pods]
    for pod in pool.pods:
        name = pod.metadata.name
        assert is_ready(pod), (name, pod.status.conditions)
        gate = next(c for c in pod.status.conditions if c.type == GATE)
        assert gate.status == "True", gate
        assert {c.name for c in pod.spec.containers} == {"vllm", "hotswap-engine"}
        assert pod.metadata.labels.get("hotswap.dev/weight-version") == "base", pod.metadata.labels
        agent = pool.agents[name]
        assert agent is not None and agent["serving_version"] is None, (name, agent)
    first, second = pool.outputs.values()
    assert first == second, "two replicas of one checkpoint answer differently"

    n = settle(kube, operator)
    available = condition(kube.pool(), "Available")
    assert available is not None and available["status"] == "True", available
    assert kube.apps.read_namespaced_deployment(POOL, kube.namespace).spec.replicas == n
    version = serving(kube)
    assert_pool_serves(kube, version, expected_outputs(kube, checkpoints, pool, version), n)


def test_2_weight_version_rolls_out(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    timings: dict[str, float],
) -> None:
    """From: the pool settled (in file order: on base). To: every pod serves v2 (ckpts/v2), the pool's
    currentVersion is v2."""
    n = settle(kube, operator)
    throttle(kube, None)
    kube.create_wv("v2", "ckpts/v2")
    t0 = time.monotonic()
    # `kubectl wait --for=condition=Applied` is how users wait for a version.
    waiter = subprocess.Popen(
        [
            str(kube.kubectl_bin),
            "-n",
            kube.namespace,
            "wait",
            "--for=condition=Applied",
            "wv/chat-v2",
            "--timeout=600s",
        ],
        env={"KUBECONFIG": kube.kubeconfig, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_phase(kube, operator, "v2", "Complete")
    timings["rollout_v2_s"] = time.monotonic() - t0
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, out
    assert "condition met" in out, out

    st = kube.wv("v2")["status"]
    durations = st["stageDurations"]
    log(f"v2 complete after {timings['rollout_v2_s']:.1f}s; stage durations {durations}")
    for stage in ("staging", "transfer", "reload"):
        assert durations.get(stage) is not None and durations[stage] >= 0, durations
        timings[f"v2_{stage}_s"] = durations[stage]
    assert st["updatedReplicas"] == n and st["replicas"] == n and st.get("failedReplicas", 0) == 0, st
    assert st["startTime"] and st["completionTime"], st
    for type_ in ("Accepted", "Staged", "Applied"):
        c = condition(kube.wv("v2"), type_)
        assert c is not None and c["status"] == "True", (type_, c)

    wait_events(kube, "WeightVersion", "chat-v2", {"Accepted", "Staging", "Updating", "Complete"})
    wait_events(kube, "InferencePool", POOL, {"VersionChanged"}, says="now serving v2")

    expected = checkpoints.reference("ckpts/v2").result(timeout=900)
    assert expected != pool.base, "the variant must answer differently from the base"
    assert_pool_serves(kube, "v2", expected, n)
    pool_st = kube.pool()["status"]
    assert pool_st["targetVersion"] == "v2" and pool_st["updatedReplicas"] == n, pool_st
    # The operator runs with a 10-minute safety-net resync (e2e_fleet.OperatorProcess): the rollout
    # moved on events alone; and its reconciles read from the watch-fed caches, not one LIST.
    sent = [
        line
        for line in operator.metrics_text().splitlines()
        if line.startswith("hotswap_operator_apiserver_requests_total{")
    ]
    assert sent and not [line for line in sent if 'call="list_' in line], sent


@pytest.mark.parametrize(
    ("version", "source", "says"),
    [
        ("missing", "ckpts/does-not-exist", "does-not-exist"),
        ("other-model", "ckpts/other-model", "does not match the served model"),
    ],
)
def test_3_bad_source_fails_and_pool_keeps_serving(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    version: str,
    source: str,
    says: str,
) -> None:
    """From: the pool settled, serving some version (in file order: v2). To: the same; the bad
    WeightVersion is Failed with a message."""
    n = settle(kube, operator)
    throttle(kube, None)
    before = serving(kube)
    target = (kube.pool().get("status") or {}).get("targetVersion")
    kube.create_wv(version, source)
    wait_phase(kube, operator, version, "Failed", timeout=300)
    st = kube.wv(version)["status"]
    log(f"{version} failed: {st['message']}")
    assert says in st["message"], st["message"]
    applied = condition(kube.wv(version), "Applied")
    assert applied is not None and applied["status"] == "False", applied
    wait_events(kube, "WeightVersion", f"{POOL}-{version}", {"Failed"}, warning=True)
    # Every replica still serves what it served, Ready.
    kube.wait(
        lambda: kube.pool()["status"].get("readyReplicas") == n,
        60,
        f"{n} ready replicas after a failure",
        operator,
    )
    assert_pool_serves(kube, before, expected_outputs(kube, checkpoints, pool, before), n)
    assert (kube.pool().get("status") or {}).get("targetVersion") == target


def test_4_newer_version_supersedes_one_in_progress(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    timings: dict[str, float],
) -> None:
    """From: the pool settled. v3 (the base checkpoint again) is throttled; v4 (ckpts/v3) is applied
    while v3 rolls out. To: v3 Superseded, every pod serves v4."""
    n = settle(kube, operator)
    # About 12 s per transfer: long enough to act while one runs.
    throttle(kube, max(1, model_bytes(checkpoints) // 12))
    kube.create_wv("v3", "models/base")
    t0 = time.monotonic()
    kube.wait(lambda: agents_updating(kube, "v3"), 300, "v3 transferring", operator)
    assert phase(kube, "v3") == "Updating"
    kube.create_wv("v4", "ckpts/v3")
    wait_phase(kube, operator, "v4", "Complete")
    timings["supersede_to_v4_s"] = time.monotonic() - t0
    log(f"v3 superseded, v4 complete after {timings['supersede_to_v4_s']:.1f}s")

    transfer = kube.wv("v4")["status"]["stageDurations"]["transfer"]
    assert transfer >= 3, f"the throttle (about 12 s per transfer) did not hold: {transfer}s"
    v3 = kube.wv("v3")["status"]
    assert v3["phase"] == "Superseded", v3
    applied = condition(kube.wv("v3"), "Applied")
    assert applied is not None and (applied["status"], applied["reason"]) == ("False", "Superseded"), applied
    wait_events(kube, "WeightVersion", "chat-v3", {"Superseded"})
    expected = checkpoints.reference("ckpts/v3").result(timeout=900)
    assert expected != pool.base, "the variant must answer differently from the base"
    assert_pool_serves(kube, "v4", expected, n)


def test_5_operator_killed_mid_rollout_resumes(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    timings: dict[str, float],
) -> None:
    """From: the pool settled. v5 (the v2 checkpoint), throttled; the operator is SIGKILLed while v5 is
    in progress and started again. To: the restarted operator resumed v5's rollout (not a new one) and
    every pod serves v5 (= ckpts/v2's output)."""
    n = settle(kube, operator)
    # About 12 s per transfer: the rollout is still in progress when the operator is killed.
    throttle(kube, max(1, model_bytes(checkpoints) // 12))
    kube.create_wv("v5", "ckpts/v2")
    t0 = time.monotonic()
    kube.wait(lambda: phase(kube, "v5") in ("Staging", "Updating"), 300, "v5 in progress", operator)
    try:
        operator.stop(signal.SIGKILL)  # returns once the process is gone: it writes nothing any more
        killed = kube.wv("v5")["status"]
        log(f"operator killed with v5 {killed['phase']}")
        assert killed["phase"] in ("Staging", "Updating"), killed
        assert killed.get("startTime"), killed
    finally:
        operator.start()
    wait_phase(kube, operator, "v5", "Complete")
    timings["rollout_v5_with_restart_s"] = time.monotonic() - t0
    log(f"v5 complete {timings['rollout_v5_with_restart_s']:.1f}s after it was created")
    done = kube.wv("v5")["status"]
    # The rollout the first operator started is the one that completed: its start time is kept (the
    # second operator read it back from the status, as it did the rollout's group and attempt).
    assert done["startTime"] == killed["startTime"], (killed, done)
    assert_pool_serves(kube, "v5", checkpoints.reference("ckpts/v2").result(timeout=900), n)


def test_6_scale_up_catches_up_peer_to_peer(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    timings: dict[str, float],
) -> None:
    """From: the pool settled on a published version (in file order: 2 pods on v5). `kubectl scale
    hspool/chat` up by one. To: every pod serves that version; the new one read it peer-to-peer from
    the stable pods, was never Ready before its agent served it and, when it first turned Ready,
    answered like them; the stable pods answered throughout and ran no update."""
    settle(kube, operator)
    throttle(kube, None)
    version = ensure_published(kube, operator, "v6-setup")
    expected = expected_outputs(kube, checkpoints, pool, version)
    stable = kube.pods()
    n = len(stable)
    old = {p.metadata.name for p in stable}
    before = stable_updates(kube, stable)
    with Traffic(stable, expected) as traffic:
        res = kube.kubectl("scale", f"inferencepools.hotswap.dev/{POOL}", f"--replicas={n + 1}")
        assert res.returncode == 0, res.stdout + res.stderr
        t0 = time.monotonic()
        scale = kube.custom.get_namespaced_custom_object_scale(
            GROUP, VERSION, kube.namespace, "inferencepools", POOL
        )
        assert scale["spec"]["replicas"] == n + 1, scale
        kube.wait(
            lambda: kube.apps.read_namespaced_deployment(POOL, kube.namespace).spec.replicas == n + 1,
            60,
            f"Deployment scaled to {n + 1}",
            operator,
        )
        new_pod, seen_held_by_gate = wait_new_pod_ready(kube, old, version, expected, t0)
    timings["scale_new_pod_ready_s"] = time.monotonic() - t0
    agent = kube.agent_status(new_pod)
    assert agent is not None
    u = agent["update"]
    log(
        f"new pod {new_pod.metadata.name} Ready after {timings['scale_new_pod_ready_s']:.1f}s "
        f"(held by the weights gate while containers were ready: {seen_held_by_gate}); "
        f"catch-up {describe_update(u)}; stable pods answered {traffic.summary()}"
    )
    assert_p2p_catch_up(u, version, sources=old, failed=set())
    timings["scale_p2p_pull_s"] = u["durations"]["p2p"]
    # The stable pods never paused: every request they got meanwhile was answered with the version's
    # output, and their agents ran no update (the reads were one-sided).
    traffic.check(old)
    assert stable_updates(kube, stable) == before
    kube.wait(
        lambda: kube.pool()["status"].get("readyReplicas") == n + 1, 120, f"{n + 1} ready replicas", operator
    )
    assert_pool_serves(kube, version, expected, n + 1)
    assert kube.pool()["status"]["updatedReplicas"] == n + 1


def test_7_source_pod_deleted_mid_transfer(
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: PoolStart,
    timings: dict[str, float],
) -> None:
    """From: the pool settled on a published version (in file order: 3 pods on v5). Transfers
    throttled (about 20 s per copy of the model), scale up by one and, once the new pod's peer-to-peer
    read is under way, delete one of its sources. To: the new pod serves the version, its bytes came
    from the remaining holders (the deleted one is named failed); the Deployment's replacement for the
    deleted pod catches up too and every replica is Ready again."""
    settle(kube, operator)
    version = ensure_published(kube, operator, "v7-setup")
    expected = expected_outputs(kube, checkpoints, pool, version)
    throttle(kube, max(1, model_bytes(checkpoints) // 20))
    stable = sorted(kube.pods(), key=lambda p: p.metadata.name)
    n = len(stable)
    assert n >= 2, [p.metadata.name for p in stable]
    old = {p.metadata.name for p in stable}
    victim, survivors = stable[0], stable[1:]
    before = stable_updates(kube, survivors)
    res = kube.kubectl("scale", f"inferencepools.hotswap.dev/{POOL}", f"--replicas={n + 1}")
    assert res.returncode == 0, res.stdout + res.stderr
    t0 = time.monotonic()

    def pulling() -> Any:
        for pod in kube.pods():
            if pod.metadata.name in old:
                continue
            u = (kube.agent_status(pod) or {}).get("update") or {}
            if u.get("version") == version and u.get("mode") == "P2P":
                assert not is_ready(pod), f"{pod.metadata.name} Ready while it pulls {version}"
                # durations["p2p"] appears when the read is done (then the local hand-off runs)
                assert "p2p" not in u["durations"] and u["stage"] not in ("Complete", "Failed"), (
                    f"the pull ended before a source could be deleted: {u}"
                )
                if u["stage"] == "Transferring" and u["bytes_done"] > 0:
                    return pod, u
        return None

    with Traffic(survivors, expected) as traffic:
        new_pod, u = kube.wait(pulling, 900, f"the new pod pulling {version} peer-to-peer", operator)
        name = new_pod.metadata.name
        res = kube.kubectl("delete", "pod", victim.metadata.name, "--wait=false")
        assert res.returncode == 0, res.stdout + res.stderr
        t_delete = time.monotonic()
        log(
            f"{name} pulling {version} ({u['bytes_done']}/{u['bytes_total']} bytes) "
            f"{t_delete - t0:.1f}s after the scale: deleted source {victim.metadata.name}"
        )

        def finished() -> dict[str, Any] | None:
            u = (kube.agent_status(new_pod) or {}).get("update") or {}
            return u if u.get("stage") in ("Complete", "Failed") else None

        u = kube.wait(finished, 300, f"{name}'s catch-up finished", operator)
        new_pod, _ = wait_new_pod_ready(kube, old, version, expected, t0, only=name)
        timings["p2p_with_source_deleted_ready_s"] = time.monotonic() - t0
    log(
        f"{name} Ready {timings['p2p_with_source_deleted_ready_s']:.1f}s after the scale, "
        f"{time.monotonic() - t_delete:.1f}s after the deletion; catch-up {describe_update(u)}; "
        f"survivors answered {traffic.summary()}"
    )
    survivor_names = {p.metadata.name for p in survivors}
    assert_p2p_catch_up(u, version, sources=old, failed={victim.metadata.name})
    # The survivors took over the deleted pod's unread ranges.
    assert sum(u["peer_bytes"].get(n, 0) for n in survivor_names) > u["peer_bytes"].get(
        victim.metadata.name, 0
    )
    assert u["durations"]["p2p"] >= 5, f"the throttle (about 20 s per pull) did not hold: {u['durations']}"
    timings["p2p_throttled_pull_s"] = u["durations"]["p2p"]
    traffic.check(survivor_names)
    # The survivors answered while the new pod was pulling and ran no update themselves.
    assert traffic.answered_between(u["started_at"], u["finished_at"]), traffic.summary()
    assert stable_updates(kube, survivors) == before

    # The Deployment replaces the deleted pod; the replacement catches up as well (peer-to-peer).
    def all_ready() -> bool:
        pods = kube.pods()
        return len(pods) == n + 1 and all(is_ready(p) for p in pods)

    kube.wait(all_ready, 900, f"{n + 1} Ready pods again", operator)
    timings["pool_back_to_all_ready_s"] = time.monotonic() - t_delete
    replacement = [p for p in kube.pods() if p.metadata.name not in old | {name}]
    assert len(replacement) == 1, [p.metadata.name for p in replacement]
    ru = (kube.agent_status(replacement[0]) or {}).get("update") or {}
    log(
        f"pool back to {n + 1} Ready {timings['pool_back_to_all_ready_s']:.1f}s after the deletion; "
        f"replacement {replacement[0].metadata.name}: catch-up {describe_update(ru)}"
    )
    assert_p2p_catch_up(ru, version, sources=survivor_names | {name}, failed=set())
    kube.wait(
        lambda: kube.pool()["status"].get("readyReplicas") == n + 1, 120, f"{n + 1} ready replicas", operator
    )
    assert_pool_serves(kube, version, expected, n + 1)


# ---- scale-out helpers -----------------------------------------------------------------------------------


def stable_updates(kube: Cluster, pods: list[Any]) -> dict[str, Any]:
    """Each pod's latest agent update record (unchanged: no update ran there)."""
    out = {}
    for pod in pods:
        st = kube.agent_status(pod)
        assert st is not None, f"{pod.metadata.name}'s agent does not answer"
        out[pod.metadata.name] = st.get("update")
    return out


def describe_update(u: dict[str, Any]) -> str:
    return (
        f"{u.get('mode')} {u.get('stage')} {u.get('bytes_done')}/{u.get('bytes_total')} bytes, "
        f"durations {u.get('durations')}, peer_bytes {u.get('peer_bytes')}, "
        f"peers_failed {u.get('peers_failed')}"
    )


def assert_p2p_catch_up(u: dict[str, Any], version: str, sources: set[str], failed: set[str]) -> None:
    """A completed p2p update to `version` whose bytes all came from `sources`, giving up on `failed`."""
    assert u["version"] == version and u["mode"] == "P2P" and u["stage"] == "Complete", u
    peer_bytes: dict[str, int] = u["peer_bytes"]
    assert peer_bytes and set(peer_bytes) <= sources, u
    assert all(n > 0 for n in peer_bytes.values()), u
    # Every tensor byte came from a peer: bytes_total is the version's host layout (tensor bytes plus
    # alignment padding, which is not read); bytes_done is from the local hand-off that followed.
    assert 0.95 * u["bytes_total"] <= sum(peer_bytes.values()) <= u["bytes_total"], u
    assert set(u["peers_failed"]) == failed, u
    assert u["durations"].get("p2p") is not None, u


def wait_new_pod_ready(
    kube: Cluster, old: set[str], version: str, expected: list[str], t0: float, only: str | None = None
) -> tuple[Any, bool]:
    """The pod not in `old` (or `only`) until it turns Ready: never Ready before its agent serves
    `version`; when it first is, its greedy output is `expected`. Returns it and whether it was seen
    held by the weights gate alone (containers ready, pod not Ready)."""
    seen = {"not_ready": False, "held_by_gate": False}

    def first_ready() -> Any:
        new = [
            p for p in kube.pods() if p.metadata.name == only or (only is None and p.metadata.name not in old)
        ]
        if not new:
            return None
        assert len(new) == 1, [p.metadata.name for p in new]
        pod = new[0]
        if not is_ready(pod):
            seen["not_ready"] = True
            conds = {c.type: c.status for c in pod.status.conditions or []}
            if conds.get("ContainersReady") == "True":
                seen["held_by_gate"] = True  # vLLM answers /health, the weights gate holds the pod
            return None
        agent = kube.agent_status(pod)
        assert agent is not None and agent["serving_version"] == version, (
            f"{pod.metadata.name} Ready while its agent serves {agent}"
        )
        return pod

    pod = wait_for(first_ready, 900, "the new pod Ready", interval=0.3)
    got = outputs(pod)
    log(f"{pod.metadata.name} first Ready {time.monotonic() - t0:.1f}s after the scale")
    assert got == expected, f"{pod.metadata.name} Ready but answers {got}, not {expected}"
    assert seen["not_ready"] or only is not None
    return pod, seen["held_by_gate"]


class Traffic:
    """Greedy requests to `pods` in a background thread, in rounds, until the `with` block ends: every
    answer must equal `expected` (a paused or half-updated engine would fail or differ)."""

    def __init__(self, pods: list[Any], expected: list[str], pause_s: float = 0.5) -> None:
        self.pods = [(p.metadata.name, p.status.pod_ip) for p in pods]
        self.expected = expected
        self.pause_s = pause_s
        self.results: list[tuple[str, float, float, list[str] | str]] = []  # pod, start, end, output/error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, ip in self.pods:
                start = time.time()
                try:
                    got: list[str] | str = generate(f"http://{ip}:{VLLM_PORT}")
                except Exception as e:  # recorded, the test fails on it
                    got = f"{type(e).__name__}: {e}"
                self.results.append((name, start, time.time(), got))
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def summary(self) -> str:
        by_pod: dict[str, list[float]] = {}
        for name, start, end, _ in self.results:
            by_pod.setdefault(name, []).append(end - start)
        return ", ".join(f"{n}: {len(v)} rounds, slowest {max(v):.2f}s" for n, v in sorted(by_pod.items()))

    def check(self, names: set[str]) -> None:
        bad = [(n, got) for n, _, _, got in self.results if got != self.expected]
        assert not bad, f"a stable pod failed or answered otherwise: {bad[:3]}"
        assert {n for n, *_ in self.results} == names, self.summary()

    def answered_between(self, started: str, finished: str) -> bool:
        """Some request to every pod was answered inside [started, finished] (agent ISO times)."""
        lo = datetime.fromisoformat(started).timestamp()
        hi = datetime.fromisoformat(finished).timestamp()
        answered = {
            n for n, start, end, got in self.results if lo <= start and end <= hi and got == self.expected
        }
        return answered == {n for n, _ in self.pods}


def test_8_corrupted_received_byte_keeps_that_pod_out_of_traffic(
    kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints, pool: PoolStart
) -> None:
    """From: the pool settled. A version whose bytes arrive corrupted in one pod (one flipped byte of
    one tensor, the test hook in that pod's vLLM worker): the rollout completes on the pods that
    verified; the corrupted one is not Ready and is named, with the tensor, in the WeightVersion's
    status and a Warning Event. To: a clean version, which the named pod catches up to and passes."""
    import json

    from hotswap_engine.staging import read_index

    n = settle(kube, operator)
    throttle(kube, None)
    victim, *others = kube.pods()
    tensor = next(
        loc.spec.name for loc in read_index(checkpoints.path("ckpts/v2")) if "norm" in loc.spec.name
    )
    hook = checkpoints.path(CORRUPT_HOOK_FILE)
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(json.dumps({"version": "v8-bad", "pod_ip": victim.status.pod_ip, "tensor": tensor}))
    try:
        kube.create_wv("v8-bad", "ckpts/v2")
        wait_phase(kube, operator, "v8-bad", "Complete")

        def named() -> list[dict[str, Any]] | None:
            found = (kube.wv("v8-bad").get("status") or {}).get("verification") or []
            return found or None

        (entry,) = kube.wait(named, 60, "v8-bad's status names the corrupted pod", operator)
        assert entry["pod"] == victim.metadata.name and entry["level"] == "Received", entry
        assert entry["tensors"] == [tensor], entry
        wait_events(kube, "WeightVersion", "chat-v8-bad", {"VerificationFailed"}, warning=True, says=tensor)

        def out_of_traffic() -> bool:
            pods = {p.metadata.name: p for p in kube.pods()}
            bad = pods[victim.metadata.name]
            gate = next((c for c in bad.status.conditions or [] if c.type == GATE), None)
            return (
                not is_ready(bad)
                and gate is not None
                and gate.status == "False"
                and gate.reason == "VerificationFailed"
                and all(is_ready(pods[o.metadata.name]) for o in others)
            )

        kube.wait(out_of_traffic, 60, f"{victim.metadata.name} out of traffic, the others Ready", operator)
        check = (kube.agent_status(victim) or {}).get("weights_check") or {}
        assert check.get("received_ok") is False, check
        assert [m["tensor"] for m in check["received_mismatches"]] == [tensor], check
        kube.wait(
            lambda: kube.pool()["status"].get("readyReplicas") == n - 1,
            60,
            f"the pool counts {n - 1} ready replicas",
            operator,
        )
        for other in others:  # the pods that verified serve the version, and agree on it
            assert (kube.agent_status(other) or {})["weights_check"]["received_ok"] is True
    finally:
        hook.unlink(missing_ok=True)

    # A clean version: the named pod (not in the group: not healthy) catches up and passes.
    kube.create_wv("v8-good", "ckpts/v2")
    wait_phase(kube, operator, "v8-good", "Complete")
    settle(kube, operator)
    assert_pool_serves(kube, "v8-good", expected_outputs(kube, checkpoints, pool, "v8-good"), n)
    kube.wait(
        lambda: not (kube.wv("v8-bad").get("status") or {}).get("verification"),
        60,
        "v8-bad's verification list emptied once no pod serves it corrupted",
        operator,
    )
