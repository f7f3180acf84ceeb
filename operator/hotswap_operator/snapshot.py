"""API objects (plain dicts, as the apiserver returns them) → the planner's views. Pure.

Kept apart from `planner` so the planner never sees Kubernetes' shapes, and apart from the handlers
so the parsing rules (what counts as running, ready, deleting) have unit tests of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from hotswap_api import protocol
from hotswap_api.labels import READINESS_GATE, VERSION_LABEL
from hotswap_api.resources import (
    InferencePool,
    WeightVersion,
)

from hotswap_operator.planner import Fleet, PodView, VersionView

Obj = Mapping[str, Any]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(value: str | datetime | None) -> datetime:
    if value is None:
        return EPOCH
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _condition(pod: Obj, type_: str) -> bool | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return bool(c.get("status") == "True")
    return None


def _reason(pod: Obj, type_: str) -> str | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("reason") or "") or None
    return None


def pod_view(pod: Obj, agent: protocol.AgentStatus | None) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return PodView(
        name=meta["name"],
        ip=status.get("podIP") or None,
        created=parse_time(meta.get("creationTimestamp")),
        running=status.get("phase") == "Running",
        deleting=meta.get("deletionTimestamp") is not None,
        ready=bool(_condition(pod, "Ready")),
        gate=_condition(pod, READINESS_GATE),
        gate_reason=_reason(pod, READINESS_GATE),
        label_version=(meta.get("labels") or {}).get(VERSION_LABEL),
        agent=agent,
    )


def pollable(pod: Obj) -> bool:
    """Whether the pod's agent can be asked for its status (it has an IP and is not going away)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return (
        bool(status.get("podIP")) and status.get("phase") == "Running" and not meta.get("deletionTimestamp")
    )


def version_view(obj: Obj) -> VersionView:
    wv = WeightVersion.model_validate(dict(obj))
    meta = obj.get("metadata") or {}
    return VersionView(
        name=meta["name"],
        created=parse_time(meta.get("creationTimestamp")),
        generation=int(meta.get("generation") or 1),
        spec=wv.spec,
        status=wv.status,
        resource_version=str(meta.get("resourceVersion") or ""),
        uid=str(meta.get("uid") or ""),
    )


def versions_of(
    pool: str, objects: Iterable[Obj], view: Callable[[Obj], VersionView] = version_view
) -> tuple[VersionView, ...]:
    return tuple(view(o) for o in objects if ((o.get("spec") or {}).get("poolRef") or {}).get("name") == pool)


def fleet(
    pool_obj: Obj,
    pods: Iterable[Obj],
    agents: Mapping[str, protocol.AgentStatus | None],
    versions: Iterable[Obj],
    now: datetime,
    view: Callable[[Obj], VersionView] = version_view,
) -> Fleet:
    """`view` parses one WeightVersion (a memoising one lets a reconcile skip the unchanged ones)."""
    pool = InferencePool.model_validate(dict(pool_obj))
    meta = pool_obj.get("metadata") or {}
    name = meta["name"]
    return Fleet(
        pool=name,
        generation=int(meta.get("generation") or 1),
        spec=pool.spec,
        status=pool.status,
        pods=tuple(pod_view(p, agents.get(p["metadata"]["name"])) for p in pods),
        versions=versions_of(name, versions, view),
        now=now,
    )
