"""Pod events like the kubelet's (Scheduled, Started, Killing, Unhealthy, BackOff, Failed), so
`kubectl describe` and the test diagnostics show what happened to a pod."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from .kubeapi import ApiError, KubeApi

Obj = dict[str, Any]
log = logging.getLogger("hotswap_kubelet.events")


def emit(
    api: KubeApi, pod: Obj, reason: str, message: str, warning: bool = False, component: str = "kubelet"
) -> None:
    """Best effort: an event that cannot be written is logged, never raised."""
    meta = pod["metadata"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": reason,
        "message": message,
        "type": "Warning" if warning else "Normal",
        "source": {"component": component, "host": pod.get("spec", {}).get("nodeName", "")},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
    except ApiError as e:
        log.debug("event %s for %s/%s not written: %s", reason, meta["namespace"], meta["name"], e)
