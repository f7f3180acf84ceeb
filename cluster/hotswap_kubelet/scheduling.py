"""Pure placement rules for the one local node (instead of a kube-scheduler).

A pod fits when its nodeSelector matches the node's labels, its required node affinity (the
matchExpressions this needs: In, NotIn, Exists, DoesNotExist) matches, and the extended resources
it requests (nvidia.com/gpu) are free. CPU and memory requests are not accounted: local processes
do not honour them anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Obj = dict[str, Any]
EXTENDED = ("nvidia.com/gpu",)


def pod_requests(pod: Obj, resource: str) -> int:
    spec = pod.get("spec", {})
    main = 0
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        main += int((res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource) or 0)
    init = 0
    for c in spec.get("initContainers") or []:
        res = c.get("resources") or {}
        init = max(
            init,
            int((res.get("requests") or {}).get(resource) or (res.get("limits") or {}).get(resource) or 0),
        )
    return max(main, init)


def holds_resources(pod: Obj) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and pod.get("status", {}).get("phase") not in (
        "Succeeded",
        "Failed",
    )


def _match_expr(expr: Obj, labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    return False


def unfit_reason(
    pod: Obj, node_labels: dict[str, str], capacity: dict[str, int], bound: Iterable[Obj]
) -> str:
    """'' if the pod fits on the node next to the pods already `bound` there, else why not."""
    spec = pod.get("spec", {})
    for k, v in (spec.get("nodeSelector") or {}).items():
        if node_labels.get(k) != v:
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if required:
        terms = required.get("nodeSelectorTerms") or []
        if not any(all(_match_expr(e, node_labels) for e in t.get("matchExpressions") or []) for t in terms):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    bound = list(bound)
    for res in EXTENDED:
        want = pod_requests(pod, res)
        if want == 0:
            continue
        used = sum(pod_requests(p, res) for p in bound if holds_resources(p))
        if used + want > capacity.get(res, 0):
            return f"0/1 nodes are available: 1 Insufficient {res}."
    return ""
