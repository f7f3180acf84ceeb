"""The local kubelet's pure logic: env resolution, pod IPs, status conditions, placement."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hotswap_kubelet.ipam import PodIPAllocator, parse_range
from hotswap_kubelet.podenv import ConfigError, command_line, container_env, expand
from hotswap_kubelet.podstatus import ContainerView, Terminated, compute_status, phase
from hotswap_kubelet.scheduling import unfit_reason

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "sa"},
    "status": {"podIP": "127.0.0.20", "hostIP": "127.0.0.1"},
}


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"


def test_container_env_resolves_downward_api_secrets_and_configmaps() -> None:
    secret = {"data": {"k": base64.b64encode(b"s3cret").decode()}}
    cm = {"data": {"mode": "fast", "other": "y"}}
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "mode"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
            {"name": "URL", "value": "http://$(IP):80/$(NAME)"},
        ],
    }
    secrets = {"s": secret}.get
    cms = {"cm": cm}.get
    env = container_env(POD, container, {"PATH": "/bin"}, secrets, cms)
    assert env["NAME"] == "p" and env["IP"] == "127.0.0.20" and env["APP"] == "x"
    assert env["S"] == "s3cret" and env["M"] == "fast" and env["CM_other"] == "y"
    assert env["URL"] == "http://127.0.0.20:80/p" and "OPT" not in env and env["PATH"] == "/bin"
    with pytest.raises(ConfigError, match="not found"):
        container_env(
            POD,
            {
                "name": "c",
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}],
            },
            {},
            secrets,
            cms,
        )


def test_command_line_needs_a_command_since_images_are_ignored() -> None:
    assert command_line({"name": "c", "command": ["echo"], "args": ["$(X)"]}, {"X": "hi"}) == ["echo", "hi"]
    with pytest.raises(ConfigError, match="ignores images"):
        command_line({"name": "c", "args": ["x"]}, {})


def test_ip_allocator_is_unique_reuses_preferred_and_releases() -> None:
    ips = PodIPAllocator(parse_range("127.0.0.16-127.0.0.18"))
    a = ips.allocate("a")
    assert ips.allocate("a") == a
    b = ips.allocate("b", preferred="127.0.0.18")
    assert b == "127.0.0.18"
    c = ips.allocate("c")
    assert len({a, b, c}) == 3
    with pytest.raises(RuntimeError):
        ips.allocate("d")
    ips.release("a")
    assert ips.allocate("d") == a
    with pytest.raises(ValueError):
        parse_range("10.0.0.1-10.0.0.2")


def running(name: str, ready: bool) -> ContainerView:
    return ContainerView(name=name, image="", running_since="t0", ready=ready, started=True)


def conds(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_ready_honours_readiness_gates_and_keeps_transition_times() -> None:
    pod = {**POD, "spec": {**POD["spec"], "readinessGates": [{"conditionType": "g"}]}}
    st = compute_status(pod, [], [running("a", True)], True, "127.0.0.20", "127.0.0.1", "t0", "t1")
    assert conds(st) == {"Initialized": "True", "ContainersReady": "True", "Ready": "False"}
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ReadinessGatesNotReady" and '"g" does not exist' in ready["message"]
    gated = {
        **pod,
        "status": {**pod["status"], "conditions": [{"type": "g", "status": "True"}, *st["conditions"]]},
    }
    st2 = compute_status(gated, [], [running("a", True)], True, "127.0.0.20", "127.0.0.1", "t0", "t2")
    assert conds(st2)["Ready"] == "True"
    assert all(c["type"] != "g" for c in st2["conditions"])  # never writes conditions it does not own
    cr = next(c for c in st2["conditions"] if c["type"] == "ContainersReady")
    assert cr["lastTransitionTime"] == "t1"
    st3 = compute_status(gated, [], [running("a", False)], True, "127.0.0.20", "127.0.0.1", "t0", "t3")
    assert conds(st3) == {"Initialized": "True", "ContainersReady": "False", "Ready": "False"}


def test_phase_follows_restart_policy() -> None:
    done = ContainerView(name="a", image="", terminated=Terminated(0, "Completed", "t0", "t1"))
    failed = ContainerView(name="a", image="", terminated=Terminated(2, "Error", "t0", "t1"))
    never = {"spec": {"restartPolicy": "Never"}}
    on_failure = {"spec": {"restartPolicy": "OnFailure"}}
    assert phase(never, [], [done], True) == "Succeeded"
    assert phase(never, [], [failed], True) == "Failed"
    assert phase(on_failure, [], [done], True) == "Succeeded"
    assert phase(on_failure, [], [failed], True) == "Running"
    assert phase({"spec": {}}, [], [running("a", True)], True) == "Running"
    assert phase({"spec": {}}, [], [ContainerView(name="a", image="")], True) == "Pending"


def test_placement_counts_gpus_and_matches_selectors() -> None:
    labels = {"kubernetes.io/hostname": "n1"}

    def gpu_pod(n: int, **spec: Any) -> dict[str, Any]:
        c = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(n)}}}
        return {"metadata": {"name": "p"}, "spec": {"containers": [c], **spec}, "status": {}}

    assert unfit_reason(gpu_pod(2), labels, {"nvidia.com/gpu": 2}, []) == ""
    assert "Insufficient nvidia.com/gpu" in unfit_reason(
        gpu_pod(1), labels, {"nvidia.com/gpu": 2}, [gpu_pod(2)]
    )
    finished = {**gpu_pod(2), "status": {"phase": "Succeeded"}}
    assert unfit_reason(gpu_pod(1), labels, {"nvidia.com/gpu": 2}, [finished]) == ""
    assert "selector" in unfit_reason(gpu_pod(0, nodeSelector={"zone": "a"}), labels, {}, [])
