"""What the commands print, as pure functions of the objects read from the API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hotswap_api.labels import BASE_VERSION, READINESS_GATE, VERSION_LABEL
from hotswap_api.resources import (
    InferencePool,
    Phase,
    StageDurations,
    WeightVersion,
    version_order,
)

Obj = dict[str, Any]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, rest = divmod(value, 60)
    return f"{int(minutes)}m{rest:04.1f}s"


def stage_summary(d: StageDurations | None) -> str:
    d = d or StageDurations()
    return f"staging {seconds(d.staging)}, transfer {seconds(d.transfer)}, reload {seconds(d.reload)}"


def progress_line(wv: WeightVersion, elapsed_s: float) -> str:
    """One line for the live display: phase, pods, stage durations, time waited."""
    st = wv.status
    pods = f"{st.updated_replicas}/{st.replicas} pods updated"
    if st.failed_replicas:
        pods += f", {st.failed_replicas} failed"
    line = f"{st.phase.value:<10} {pods}  ({stage_summary(st.stage_durations)})  [{seconds(elapsed_s)}]"
    if st.message and st.phase != Phase.COMPLETE:
        line += f"  {st.message}"
    return line


def progress_key(wv: WeightVersion) -> tuple[Any, ...]:
    """What a non-terminal display compares to decide whether to print a new line (not the clock)."""
    st = wv.status
    d = st.stage_durations or StageDurations()
    return (
        st.phase,
        st.updated_replicas,
        st.replicas,
        st.failed_replicas,
        d.staging,
        d.transfer,
        d.reload,
        st.message,
    )


def outcome_line(pool: str, wv: WeightVersion) -> str:
    st = wv.status
    took = ""
    if st.start_time and st.completion_time:
        took = f" in {seconds((st.completion_time - st.start_time).total_seconds())}"
    return (
        f"{pool} {wv.spec.version}: {st.phase.value}{took}, {st.updated_replicas}/{st.replicas} pods "
        f"({stage_summary(st.stage_durations)})"
    )


@dataclass(frozen=True)
class PodRow:
    name: str
    ready: bool
    version: str
    node: str
    ip: str
    weights_ready: bool


def _condition(pod: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def pod_row(pod: Obj) -> PodRow:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return PodRow(
        name=str(meta.get("name", "")),
        ready=_condition(pod, "Ready"),
        version=str((meta.get("labels") or {}).get(VERSION_LABEL, "")),
        node=str((pod.get("spec") or {}).get("nodeName") or ""),
        ip=str(status.get("podIP") or ""),
        weights_ready=_condition(pod, READINESS_GATE),
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, like kubectl's; '-' for empty cells."""
    cells = [list(headers)] + [[c if c else "-" for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def pods_table(rows: Sequence[PodRow]) -> str:
    return table(
        ["POD", "READY", "VERSION", "NODE", "IP"],
        [[r.name, "True" if r.ready else "False", r.version, r.node, r.ip] for r in rows],
    )


def _latest(versions: Sequence[WeightVersion]) -> WeightVersion | None:
    """The newest version: the one the operator makes the pool's target (`version_order`)."""

    def order(wv: WeightVersion) -> tuple[object, ...]:
        raw = str(wv.metadata.get("creationTimestamp") or "")
        created = datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else _EPOCH
        rv = str(wv.metadata.get("resourceVersion") or "")
        return version_order(wv.status.sequence, created, rv, wv.spec.version)

    return max(versions, key=order, default=None)


def status_text(pool: InferencePool, pods: Sequence[Obj], versions: Sequence[WeightVersion]) -> str:
    meta = pool.metadata
    st = pool.status
    lines = [
        f"InferencePool {meta.get('namespace')}/{meta.get('name')}: desired {pool.spec.replicas}, "
        f"ready {st.ready_replicas}, updated {st.updated_replicas}",
        f"current version: {st.current_version or BASE_VERSION}   target version: "
        f"{st.target_version or st.current_version or BASE_VERSION}",
    ]
    if st.conditions:
        lines.append("conditions: " + "  ".join(f"{c.type}={c.status.value}" for c in st.conditions))
        problems = [c for c in st.conditions if c.type == "Degraded" and c.status.value == "True"]
        lines += [f"  Degraded ({c.reason}): {c.message}" for c in problems]
    latest = _latest(versions)
    if latest is not None:
        lines.append(f"latest rollout: {outcome_line(str(meta.get('name')), latest)}")
        if latest.status.message and latest.status.phase != Phase.COMPLETE:
            lines.append(f"  {latest.status.message}")
    rows = sorted((pod_row(p) for p in pods), key=lambda r: r.name)
    lines.append("")
    lines.append(pods_table(rows) if rows else "no pods")
    return "\n".join(lines)


_ROLLOUT_FIELDS = {
    "phase",
    "replicas",
    "updated_replicas",
    "failed_replicas",
    "stage_durations",
    "message",
    "start_time",
    "completion_time",
}


def status_json(pool: InferencePool, pods: Sequence[Obj], versions: Sequence[WeightVersion]) -> Obj:
    meta = pool.metadata
    st = pool.status
    latest = _latest(versions)
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "replicas": pool.spec.replicas,
        "readyReplicas": st.ready_replicas,
        "updatedReplicas": st.updated_replicas,
        "currentVersion": st.current_version or BASE_VERSION,
        "targetVersion": st.target_version or st.current_version or BASE_VERSION,
        "conditions": [c.to_api() for c in st.conditions],
        "latestRollout": (
            None
            if latest is None
            else {
                "version": latest.spec.version,
                **latest.status.model_dump(mode="json", by_alias=True, include=_ROLLOUT_FIELDS),
            }
        ),
        "pods": [
            {
                "name": r.name,
                "ready": r.ready,
                "weightsReady": r.weights_ready,
                "version": r.version,
                "node": r.node,
                "ip": r.ip,
            }
            for r in sorted((pod_row(p) for p in pods), key=lambda r: r.name)
        ],
    }
