"""Where a reconcile reads its pool's pods and WeightVersions from: the watch, not a LIST per call.

`IndexReader` reads two kopf indices that kopf keeps current from its watch streams (`handlers`
registers them): pods by (namespace, pool label), WeightVersions by (namespace, spec.poolRef.name).
A reconcile then costs no apiserver request for them, only what its pool holds: the pods of the
pool (linear) and the versions of the pool (bounded by the pool's `versionHistoryLimit`), never the
namespace's. kopf calls no handler before every index has its initial listing, so a pool's loop,
which a handler starts, never sees a half-filled cache.

`ListReader` LISTs (by label; versions of the namespace, filtered): for a `PoolController` used
without kopf (tests that drive one reconcile at a time).

`ViewCache` parses each WeightVersion once per resourceVersion: a reconcile does not re-validate the
finished history on every pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol

from hotswap_api.labels import POOL_LABEL

from hotswap_operator import snapshot
from hotswap_operator.kube import Kube
from hotswap_operator.planner import VersionView

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, pool)


class FleetReader(Protocol):
    async def pods(self, namespace: str, pool: str) -> list[Obj]: ...

    async def versions(self, namespace: str, pool: str) -> list[Obj]: ...


def pool_of_version(obj: Mapping[str, Any]) -> str | None:
    name = ((obj.get("spec") or {}).get("poolRef") or {}).get("name")
    return str(name) if name else None


class IndexReader:
    """Reads kopf indices (`kopf.Index`: key → a store of the values the indexing functions gave)."""

    def __init__(self, pods: Mapping[Key, Iterable[Obj]], versions: Mapping[Key, Iterable[Obj]]) -> None:
        self._pods = pods
        self._versions = versions

    async def pods(self, namespace: str, pool: str) -> list[Obj]:
        return list(self._pods.get((namespace, pool), ()))

    async def versions(self, namespace: str, pool: str) -> list[Obj]:
        return list(self._versions.get((namespace, pool), ()))


class ListReader:
    """LIST calls (no watch): for controllers driven without kopf."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def pods(self, namespace: str, pool: str) -> list[Obj]:
        return await self.kube.list_pods(namespace, f"{POOL_LABEL}={pool}")

    async def versions(self, namespace: str, pool: str) -> list[Obj]:
        return [o for o in await self.kube.list_weight_versions(namespace) if pool_of_version(o) == pool]


class ViewCache:
    """`snapshot.version_view` memoised by (uid, resourceVersion); `keep` forgets deleted objects."""

    def __init__(self) -> None:
        self._views: dict[str, tuple[str, VersionView]] = {}
        self._misses = 0  # views built since the last `keep`

    def view(self, obj: Mapping[str, Any]) -> VersionView:
        meta = obj.get("metadata") or {}
        uid, rv = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
        hit = self._views.get(uid)
        if uid and rv and hit is not None and hit[0] == rv:
            return hit[1]
        view = snapshot.version_view(obj)
        self._misses += 1
        if uid and rv:
            self._views[uid] = (rv, view)
        return view

    def keep(self, objects: Collection[Mapping[str, Any]]) -> None:
        # Every object was a hit and as many as cached: none can be gone (a replacement would have
        # been a miss), so the scan is skipped: a pool with 1,000 versions pays it only on change.
        misses, self._misses = self._misses, 0
        if not misses and len(objects) == len(self._views):
            return
        live = {str((o.get("metadata") or {}).get("uid") or "") for o in objects}
        for uid in [u for u in self._views if u not in live]:
            del self._views[uid]

    def __len__(self) -> int:
        return len(self._views)
