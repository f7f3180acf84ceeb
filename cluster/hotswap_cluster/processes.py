"""Finding the local processes that run pods (each carries HOTSWAP_POD_UID / HOTSWAP_POD in its
environment, set by the kubelet and inherited by anything it spawns)."""

from __future__ import annotations

import os


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pod_processes(namespace: str | None = None, uid: str | None = None) -> dict[int, str]:
    """Live (non-zombie) pod processes: pid -> "namespace/pod"; filtered by namespace or pod uid."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        env = _environ(pid)
        pod = env.get("HOTSWAP_POD")
        if pod is None or _is_zombie(pid):
            continue
        if namespace is not None and not pod.startswith(namespace + "/"):
            continue
        if uid is not None and env.get("HOTSWAP_POD_UID") != uid:
            continue
        out[pid] = pod
    return out
