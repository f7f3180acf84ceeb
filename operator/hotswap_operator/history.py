"""A pool's WeightVersion history, kept between reconciles, and the part of it a plan reads.

A pool keeps up to `versionHistoryLimit` finished versions (an RL run publishes about a thousand a
day). The planner's decisions about a finished version are fixed unless a pod serves it, it carries
verification results, it is the pool's newest, or the history limit prunes it: it is neither
superseded, driven nor verified, and only counts toward the limit. So a reconcile hands the planner a
*window*: every version it may act on, plus the number of finished versions it left out
(`Fleet.hidden_history`), and planning over the window decides exactly what planning over the whole
history decides (a property test holds them equal: tests/unit/test_operator_history.py).

`VersionBook` keeps the parsed, sorted history between reconciles and rebuilds it only when the
watch replaced an object (kopf's index stores a new dict per event: an unchanged history is the same
objects, compared by identity at C speed). With both, a reconcile's cost no longer grows with the
history (#14 item 2).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from operator import is_
from typing import Any

from hotswap_api.labels import BASE_VERSION

from hotswap_operator.planner import Fleet, VersionView
from hotswap_operator.watched import ViewCache, pool_of_version

Obj = dict[str, Any]


@dataclass(frozen=True)
class Index:
    """A pool's versions, sorted once, with what `window` picks from."""

    ordered: tuple[VersionView, ...]  # oldest first (`resources.version_order`)
    always: tuple[VersionView, ...]  # in every window (`index` says which)
    finished: tuple[VersionView, ...]  # terminal phase, oldest first
    by_version: Mapping[str, tuple[VersionView, ...]]  # by spec.version


def index(views: Iterable[VersionView]) -> Index:
    ordered = tuple(sorted(views, key=lambda v: v.order))
    newest_numbered = next((v for v in reversed(ordered) if v.status.sequence is not None), None)
    always = tuple(
        v
        for v in ordered
        # in progress or new (superseded or driven), not numbered yet (numbering continues from the
        # newest numbered one), carrying verification results (rewritten when pods change)
        if not v.status.phase.terminal or v.status.sequence is None or v.status.verification
    )
    extra = tuple(v for v in (newest_numbered, ordered[-1] if ordered else None) if v is not None)
    by_version: dict[str, list[VersionView]] = {}
    for v in ordered:
        by_version.setdefault(v.spec.version, []).append(v)
    return Index(
        ordered=ordered,
        always=always + extra,
        finished=tuple(v for v in ordered if v.status.phase.terminal),
        by_version={k: tuple(vs) for k, vs in by_version.items()},
    )


def window(
    ix: Index, current: str | None, served: Collection[str | None], limit: int
) -> tuple[tuple[VersionView, ...], int]:
    """The versions a plan must see, oldest first, and how many finished ones it leaves out.

    In: what `always` holds; every version of the pool's `current` version, of a version a pod
    serves (`served`), and of the newest version while it runs (completing it in this plan protects
    its version from pruning); and the oldest finished versions beyond `limit` that are not
    `current` (those the plan prunes; every version left out is newer, as `planner.prune_versions`
    requires). The ones left out are finished and never protected, so the plan counts them toward
    the limit whichever version it ends on."""
    chosen: dict[str, VersionView] = {v.name: v for v in ix.always}
    newest = ix.ordered[-1] if ix.ordered else None
    named = {current, *served}
    if newest is not None and not newest.status.phase.terminal:
        named.add(newest.spec.version)
    for version in named:
        if version is not None:
            chosen.update((v.name, v) for v in ix.by_version.get(version, ()))
    protected = sum(1 for v in ix.by_version.get(current, ()) if v.status.phase.terminal) if current else 0
    excess = max(0, len(ix.finished) - protected - limit)
    for v in ix.finished:
        if excess <= 0:
            break
        if v.spec.version != current:
            chosen[v.name] = v
            excess -= 1
    shown = sum(1 for v in chosen.values() if v.status.phase.terminal)
    return tuple(sorted(chosen.values(), key=lambda v: v.order)), len(ix.finished) - shown


def windowed(fleet: Fleet, ix: Index) -> Fleet:
    """`fleet` with the window of its history in place of every version."""
    current = fleet.status.current_version
    current = None if current in (None, "", BASE_VERSION) else current  # as the planner protects it
    served = {p.serving for p in fleet.pods}
    versions, hidden = window(ix, current, served, fleet.spec.version_history_limit)
    return replace(fleet, versions=versions, hidden_history=hidden)


class VersionBook:
    """One pool's versions between reconciles: parsed views, sorted (`index`), and the objects by name."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._views = ViewCache()
        # As last given (held, so their ids cannot be reused): identities say whether anything changed.
        self._objects: list[Obj] = []
        self._index = index(())
        self._by_name: dict[str, Obj] = {}

    def update(self, objects: Sequence[Obj]) -> Index:
        """The index of `objects` (the pool's WeightVersions as the watch has them)."""
        if len(objects) == len(self._objects) and all(map(is_, objects, self._objects)):
            return self._index
        mine = [o for o in objects if pool_of_version(o) == self.pool]
        views = [self._views.view(o) for o in mine]  # parses only objects new since the last change
        self._views.keep(mine)
        self._objects = list(objects)
        self._by_name = {str(o["metadata"]["name"]): o for o in mine}
        self._index = index(views)
        return self._index

    @property
    def objects(self) -> Mapping[str, Obj]:
        """The pool's WeightVersion objects by name, as of the last `update`."""
        return self._by_name
