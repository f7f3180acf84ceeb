"""Pure computation of the pod status the kubelet reports, from what it knows of its processes.

The kubelet patches only the fields and conditions it owns (strategic merge on conditions, keyed
by type), so conditions set by others (readiness gates) survive; Ready is True only when every
readiness gate's condition is True, as the real kubelet computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

OWN_CONDITIONS = ("Initialized", "ContainersReady", "Ready")


@dataclass
class Terminated:
    exit_code: int
    reason: str
    started_at: str
    finished_at: str
    message: str = ""

    def to_api(self) -> Obj:
        out: Obj = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class ContainerView:
    """What the kubelet knows about one container at one moment."""

    name: str
    image: str
    restart_count: int = 0
    running_since: str | None = None
    pid: int | None = None
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    terminated: Terminated | None = None
    last_terminated: Terminated | None = None
    ready: bool = False
    started: bool = False
    extra: Obj = field(default_factory=dict)

    def to_api(self) -> Obj:
        state: Obj
        if self.running_since is not None:
            state = {"running": {"startedAt": self.running_since}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated.to_api()}
        else:
            waiting: Obj = {"reason": self.waiting_reason}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            state = {"waiting": waiting}
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated.to_api()} if self.last_terminated else {},
        }
        if self.pid is not None:
            out["containerID"] = f"hotswap://{self.pid}"
        return out


def _condition(
    old: list[Obj], ctype: str, status: bool, now: str, reason: str = "", message: str = ""
) -> Obj:
    value = "True" if status else "False"
    prev = next((c for c in old if c.get("type") == ctype), None)
    changed = prev is None or prev.get("status") != value
    out: Obj = {
        "type": ctype,
        "status": value,
        "lastProbeTime": None,
        "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),  # type: ignore[union-attr]
    }
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def readiness_gate_message(pod: Obj) -> str:
    """'' when every readiness gate's condition is True, else the kubelet's explanation."""
    conds = {c.get("type"): c.get("status") for c in pod.get("status", {}).get("conditions") or []}
    for gate in pod.get("spec", {}).get("readinessGates") or []:
        ctype = gate["conditionType"]
        if ctype not in conds:
            return f'corresponding condition of pod readiness gate "{ctype}" does not exist.'
        if conds[ctype] != "True":
            return f'the status of pod readiness gate "{ctype}" is not "True", but {conds[ctype]}'
    return ""


def phase(pod: Obj, init: list[ContainerView], main: list[ContainerView], initialized: bool) -> str:
    policy = pod.get("spec", {}).get("restartPolicy", "Always")
    if any(c.terminated and c.terminated.exit_code != 0 for c in init) and policy == "Never":
        return "Failed"
    if not initialized:
        return "Pending"
    if main and all(c.terminated is not None and c.running_since is None for c in main):
        codes = [c.terminated.exit_code for c in main if c.terminated]
        if policy == "Never":
            return "Succeeded" if all(x == 0 for x in codes) else "Failed"
        if policy == "OnFailure" and all(x == 0 for x in codes):
            return "Succeeded"
    if any(c.running_since is not None or c.restart_count > 0 or c.terminated for c in main):
        return "Running"
    return "Pending"


def compute_status(
    pod: Obj,
    init: list[ContainerView],
    main: list[ContainerView],
    initialized: bool,
    pod_ip: str,
    host_ip: str,
    start_time: str,
    now: str,
) -> Obj:
    """The status patch body's `status` (only the kubelet's own fields and conditions)."""
    old = pod.get("status", {}).get("conditions") or []
    pod_phase = phase(pod, init, main, initialized)
    not_ready = [c.name for c in main if not c.ready]
    containers_ready = not not_ready
    terminal = pod_phase in ("Succeeded", "Failed")
    cr_msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else ""
    gate_msg = readiness_gate_message(pod)
    ready = containers_ready and not gate_msg and not terminal
    if terminal:
        ready_reason = "PodCompleted"
    elif not containers_ready:
        ready_reason = "ContainersNotReady"
    elif gate_msg:
        ready_reason = "ReadinessGatesNotReady"
    else:
        ready_reason = ""
    init_pending = [c.name for c in init if not (c.terminated and c.terminated.exit_code == 0)]
    conditions = [
        _condition(
            old,
            "Initialized",
            initialized,
            now,
            "" if initialized else "ContainersNotInitialized",
            "" if initialized else f"containers with incomplete status: [{' '.join(init_pending)}]",
        ),
        _condition(
            old,
            "ContainersReady",
            containers_ready and not terminal,
            now,
            ""
            if containers_ready and not terminal
            else ("PodCompleted" if terminal else "ContainersNotReady"),
            "" if terminal else cr_msg,
        ),
        _condition(old, "Ready", ready, now, ready_reason, cr_msg if cr_msg else gate_msg),
    ]
    status: Obj = {
        "phase": pod_phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "conditions": conditions,
        "containerStatuses": [c.to_api() for c in main],
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if init:
        status["initContainerStatuses"] = [c.to_api() for c in init]
    return status
