"""`python -m hotswap_operator` as a process against the local cluster: kopf wiring, liveness, metrics,
the Lease hand-over between two replicas, a read path without LIST calls, and no timer needed (the
safety-net resync is set to 10 minutes). No engines: the pool has no schedulable pods, so versions
complete at once (the rollout itself is covered where agents and vLLM run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bodies import GROUP, VERSION, pool_body, wv_body
from hotswap_testing.waiting import wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """wait_for where an exception from `check` (a refused connection, a 404) means 'not yet'."""
    last: list[Any] = [None]

    def probe() -> Any:
        try:
            last[0] = check()
        except Exception as e:
            last[0] = e
            return None
        return last[0]

    return wait_for(probe, timeout, what, lambda: f"last: {last[0]!r}")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        body: bytes = r.read()
        return body.decode()


class Operator:
    def __init__(self, kubeconfig: str, namespace: str, identity: str, log: Path) -> None:
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, PYTHONPATH=f"{ROOT}/api:{ROOT}/engine:{ROOT}/operator")
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hotswap_operator",
                f"--kubeconfig={kubeconfig}",
                f"--namespace={namespace}",
                f"--lease-namespace={namespace}",
                f"--identity={identity}",
                "--lease-duration=3",
                f"--liveness={self.liveness}",
                f"--metrics={self.metrics}",
                # Everything below happens on events: the safety-net timer never fires in a test.
                "--active-requeue=600",
                "--idle-requeue=600",
            ],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def live(self) -> str:
        """The liveness answer; fails at once (with the log) when the process has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"operator exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return http_get(self.liveness)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def operators(
    hotswap_cluster: Any, namespace: str, crds: None, tmp_path: Path
) -> Iterator[Callable[[str], Operator]]:
    started: list[Operator] = []

    def start(identity: str) -> Operator:
        op = Operator(hotswap_cluster.kubeconfig, namespace, identity, tmp_path / f"{identity}.log")
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
    for op in started:
        print(f"----- {op.log.name}\n{op.log.read_text()[-4000:]}")


def sample(metrics: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def condition(obj: dict[str, Any], type_: str) -> tuple[str, str] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def test_operator_process_acts_alone_and_hands_over(
    kube_api: client.ApiClient, namespace: str, operators: Callable[[str], Operator]
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    apps = client.AppsV1Api(kube_api)
    coord = client.CoordinationV1Api(kube_api)

    def get(plural: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        return out

    a = operators("op-a")
    wait(a.live, 60, "op-a liveness")
    wait(
        lambda: coord.read_namespaced_lease("hotswap-operator", namespace).spec.holder_identity == "op-a",
        30,
        "lease",
    )

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", pool_body())
    wait(lambda: apps.read_namespaced_deployment("chat", namespace), 30, "deployment")
    wait(lambda: get("inferencepools", "chat").get("status", {}).get("replicas") == 1, 30, "pool status")

    # No pod is healthy (none can be scheduled): the version waits, with a message saying so.
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body("v1"))
    wait(
        lambda: get("weightversions", "chat-v1").get("status", {}).get("message", "").startswith("waiting"),
        30,
        "v1",
    )
    assert condition(get("weightversions", "chat-v1"), "Accepted") == ("True", "Valid")

    # An orphan version says its pool is missing.
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "weightversions", wv_body("v1", pool="nope")
    )
    wait(
        lambda: condition(get("weightversions", "nope-v1"), "Accepted") == ("False", "PoolNotFound"),
        30,
        "orphan",
    )

    def orphan_events() -> list[Any]:
        evs = client.CoreV1Api(kube_api).list_namespaced_event(namespace).items
        return [e for e in evs if e.involved_object.name == "nope-v1" and e.reason == "PoolNotFound"]

    # ... and an Event says so (a Warning, once: the version's own status events do not repeat it).
    wait(orphan_events, 30, "a PoolNotFound Event on nope-v1")
    (ev,) = orphan_events()
    assert ev.type == "Warning" and "InferencePool nope does not exist" in ev.message, ev

    # A second replica waits while the first holds the Lease: it says so once it read the Lease, and
    # keeps waiting while op-a renews it for longer than a lease duration (3 s, renewed every 1 s;
    # op-b looks every 1 s and would take a record unchanged for 3 s) ...
    b = operators("op-b")
    wait(
        lambda: "op-b: lease" in (t := b.log.read_text()) and "held by op-a; waiting" in t, 60, "op-b waiting"
    )
    renewals: set[Any] = set()

    def renewed_while_b_waits() -> bool:
        lease = coord.read_namespaced_lease("hotswap-operator", namespace)
        assert lease.spec.holder_identity == "op-a", f"op-b took the lease from a live op-a: {lease.spec}"
        renewals.add(lease.spec.renew_time)
        return len(renewals) >= 6

    wait_for(renewed_while_b_waits, 30, "op-a renewing its lease 5 times while op-b waits")
    with pytest.raises(OSError):
        http_get(b.liveness)  # kopf (and its liveness endpoint) starts only once the Lease is held
    # ... and takes over when the first dies without a word.
    a.stop(signal.SIGKILL)
    wait(
        lambda: coord.read_namespaced_lease("hotswap-operator", namespace).spec.holder_identity == "op-b",
        30,
        "b leads",
    )
    wait(b.live, 60, "op-b liveness")

    # Scaling the pool to 0 lets the waiting version complete: op-b is acting.
    custom.patch_namespaced_custom_object_scale(
        GROUP,
        VERSION,
        namespace,
        "inferencepools",
        "chat",
        {"spec": {"replicas": 0}},
        _content_type="application/merge-patch+json",
    )
    wait(
        lambda: apps.read_namespaced_deployment("chat", namespace).spec.replicas == 0, 30, "deployment scaled"
    )

    def no_pods() -> bool:
        pods = client.CoreV1Api(kube_api).list_namespaced_pod(
            namespace, label_selector="hotswap.dev/pool=chat"
        )
        return not pods.items

    wait(no_pods, 60, "pods gone")
    wait(
        lambda: get("weightversions", "chat-v1").get("status", {}).get("phase") == "Complete",
        60,
        "v1 complete",
    )
    assert get("inferencepools", "chat")["status"]["currentVersion"] == "v1"
    # The metrics are observed after the reconcile's writes and actions: the status comes first.
    complete = 'hotswap_operator_rollouts_total{phase="Complete"} 1.0'
    wait(lambda: complete in http_get(f"http://{b.metrics}/metrics"), 30, "the rollout counted")
    metrics = http_get(f"http://{b.metrics}/metrics")
    # The reconciles read pods and WeightVersions from kopf's watch-fed indices: not one LIST.
    assert sample(metrics, "hotswap_operator_reconciles_total") >= 2
    sent = [
        line for line in metrics.splitlines() if line.startswith("hotswap_operator_apiserver_requests_total{")
    ]
    assert sent and not [line for line in sent if 'call="list_' in line], sent

    # A pool deleted while its version is in progress: the version fails within seconds.
    gone = pool_body()
    gone["metadata"]["name"] = "gone"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", gone)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body("v1", "gone"))
    wait(lambda: condition(get("weightversions", "gone-v1"), "Accepted") == ("True", "Valid"), 30, "gone-v1")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", "gone")
    wait(lambda: get("weightversions", "gone-v1")["status"]["phase"] == "Failed", 15, "gone-v1 failed")
    failed = get("weightversions", "gone-v1")
    assert condition(failed, "Applied") == ("False", "PoolNotFound")
    assert "deleted during the rollout" in failed["status"]["message"]
