"""What a failing cluster test shows: the object, the namespace's recent events, pod logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubernetes import client

from .control import log_dir


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def describe_namespace(api: client.ApiClient, namespace: str, log_lines: int = 30) -> str:
    core = client.CoreV1Api(api)
    parts: list[str] = []
    try:
        events = core.list_namespaced_event(namespace).items
        events.sort(key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp))
        parts.append(f"--- events in {namespace} (last 20)")
        for e in events[-20:]:
            obj = e.involved_object
            parts.append(f"{e.type} {obj.kind}/{obj.name} {e.reason}: {e.message}")
    except client.ApiException as e:
        parts.append(f"<events: {e.reason}>")
    try:
        pods: list[Any] = core.list_namespaced_pod(namespace).items
        for pod in pods:
            st = pod.status
            conds = {c.type: c.status for c in st.conditions or []}
            parts.append(f"--- pod {pod.metadata.name}: phase={st.phase} ip={st.pod_ip} conditions={conds}")
            for c in st.container_statuses or []:
                parts.append(
                    f"    {c.name}: ready={c.ready} restarts={c.restart_count} state={c.state.to_dict()}"
                )
    except client.ApiException as e:
        parts.append(f"<pods: {e.reason}>")
    pods_logs = sorted((log_dir() / "pods").glob(f"{namespace}_*.log"))
    for path in pods_logs[-6:]:
        parts.append(f"--- {path.name} (last {log_lines} lines)\n{_tail(path, log_lines)}")
    return "\n".join(parts)


def describe_object(obj: Any) -> str:
    if obj is None:
        return "<none>"
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.dumps(obj, indent=1, default=str)[-6000:]


def control_plane_logs(lines: int = 15) -> str:
    return "\n".join(
        f"--- {name} (last {lines} lines)\n{_tail(log_dir() / name, lines)}"
        for name in ("kubelet.log", "kube-controller-manager.log", "kube-apiserver.log")
    )
