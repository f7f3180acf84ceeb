"""Rolling back, decided without I/O: which earlier version to return to, and the new version's name.

A WeightVersion is an identity that is never reused, so a rollback publishes a *new* version whose
source is an earlier Complete one's: `<old>-rollback-<n>`, n one above the highest such n in the pool
(the root drops earlier `-rollback-<n>` suffixes: rolling back to v1-rollback-1 gives v1-rollback-2).

Without --to the target is the newest Complete version (by completion time) whose checkpoint differs
from the one the pool serves now, so two rollbacks in a row go back and forth like `cd -`.

Only versions still in the pool's history can come back: the operator deletes finished versions beyond
`spec.versionHistoryLimit`, and a version that is gone says so, naming the oldest one still kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from hotswap_api.labels import BASE_VERSION
from hotswap_api.resources import (
    Phase,
    SourceRef,
    WeightVersion,
    version_order,
)

from hotswap_cli.errors import CliError, ExitCode

MAX_VERSION = 63
_SUFFIX = re.compile(r"(-rollback-[0-9]+)+$")
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RollbackPlan:
    from_version: str  # the version whose checkpoint comes back ("base" for the base checkpoint)
    source: SourceRef
    new_version: str


def rollback_root(version: str) -> str:
    return _SUFFIX.sub("", version) or version


def rollback_version_name(old: str, existing: set[str]) -> str:
    """`<root>-rollback-<n>`: unused in `existing`, at most 63 characters, a valid version name."""
    root = rollback_root(old)
    pattern = re.compile(rf"^{re.escape(root)}-rollback-([0-9]+)$")
    taken = [int(m.group(1)) for v in existing if (m := pattern.match(v))]
    n = max(taken, default=0) + 1
    suffix = f"-rollback-{n}"
    head = root[: MAX_VERSION - len(suffix)].rstrip("-.")
    name = f"{head}{suffix}"
    while name in existing:  # only when truncation made two roots meet
        n += 1
        suffix = f"-rollback-{n}"
        name = f"{root[: MAX_VERSION - len(suffix)].rstrip('-.')}{suffix}"
    return name


def _completed_at(wv: WeightVersion) -> datetime:
    t = wv.status.completion_time or wv.status.start_time
    created = wv.metadata.get("creationTimestamp")
    if t is None and isinstance(created, str):
        t = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return t or _EPOCH


def _same_source(a: SourceRef | None, b: SourceRef | None) -> bool:
    return a is not None and b is not None and a == b


def _created(wv: WeightVersion) -> datetime:
    created = wv.metadata.get("creationTimestamp")
    if isinstance(created, str):
        return datetime.fromisoformat(created.replace("Z", "+00:00"))
    return _EPOCH


def _history_order(wv: WeightVersion) -> tuple[object, ...]:
    """Oldest first, as the operator orders (and prunes) them: `resources.version_order`."""
    rv = str(wv.metadata.get("resourceVersion") or "")
    return version_order(wv.status.sequence, _created(wv), rv, wv.spec.version)


def _history_hint(versions: list[WeightVersion], history_limit: int | None) -> str:
    """Where the pool's history starts, for messages about a version that is not (or no longer) there."""
    kept = sorted((wv for wv in versions if wv.status.phase == Phase.COMPLETE), key=_history_order)
    limit = f" (spec.versionHistoryLimit={history_limit})" if history_limit is not None else ""
    if kept:
        return (
            f"the pool keeps a bounded history of finished versions{limit}; the oldest version still kept "
            f"to roll back to is {kept[0].spec.version!r}"
        )
    return f"the pool keeps a bounded history of finished versions{limit} and none of them is Complete"


def plan_rollback(
    versions: list[WeightVersion],
    current_version: str | None,
    current_source: SourceRef | None,
    base_path: str,
    to: str | None,
    history_limit: int | None = None,
) -> RollbackPlan:
    """`versions`: the pool's WeightVersions; `history_limit`: its spec.versionHistoryLimit (for the
    messages). Raises CliError(NOT_FOUND or USAGE) when impossible."""
    existing = {wv.spec.version for wv in versions}
    if to == BASE_VERSION:
        return RollbackPlan(
            BASE_VERSION, SourceRef(path=base_path), rollback_version_name(BASE_VERSION, existing)
        )
    by_version = {wv.spec.version: wv for wv in versions}
    if to is not None:
        chosen = by_version.get(to)
        if chosen is None:
            raise CliError(
                ExitCode.NOT_FOUND,
                f"version {to!r} is not in this pool's history: never published, or deleted as older "
                f"than the history keeps; {_history_hint(versions, history_limit)} "
                f"(--to {BASE_VERSION} returns to the base checkpoint)",
            )
        if chosen.status.phase != Phase.COMPLETE:
            raise CliError(
                ExitCode.USAGE,
                f"version {to!r} is {chosen.status.phase.value}: only a version that completed can be "
                "rolled back to",
            )
    else:
        if current_source is None and current_version in by_version:
            current_source = by_version[current_version].spec.source
        complete = [wv for wv in versions if wv.status.phase == Phase.COMPLETE]
        candidates = [
            wv
            for wv in sorted(complete, key=_completed_at, reverse=True)
            if wv.spec.version != current_version and not _same_source(wv.spec.source, current_source)
        ]
        if not candidates:
            raise CliError(
                ExitCode.NOT_FOUND,
                "no earlier Complete version with another checkpoint to roll back to; "
                f"{_history_hint(versions, history_limit)} (--to {BASE_VERSION} returns to the base "
                "checkpoint)",
            )
        chosen = candidates[0]
    return RollbackPlan(
        chosen.spec.version, chosen.spec.source, rollback_version_name(chosen.spec.version, existing)
    )
