"""The operator's read path (`watched`) and agent watch decisions (`agent_watch`), without a cluster.

What the reconcile reads for a pool is the pool's own objects from the watch-fed indices (never a
LIST), and each WeightVersion is parsed once per resourceVersion, so the finished history does not
cost a re-validation per reconcile.
"""

from __future__ import annotations

from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_operator import snapshot
from hotswap_operator.agent_watch import RETRY_MAX_S, RETRY_MIN_S, differs, retry_after
from hotswap_operator.watched import IndexReader, ViewCache, pool_of_version


def wv(name: str, pool: str, rv: str = "1", uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "hotswap.dev/v1alpha1",
        "kind": "WeightVersion",
        "metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}", "resourceVersion": rv},
        "spec": {"poolRef": {"name": pool}, "version": name, "source": {"path": f"ckpts/{name}"}},
    }


async def test_index_reader_returns_only_the_pools_objects() -> None:
    versions = {("ns", "chat"): [wv("v1", "chat")], ("ns", "other"): [wv("v9", "other")]}
    pods = {("ns", "chat"): [{"metadata": {"name": "chat-a"}}]}
    reader = IndexReader(pods, versions)
    assert [o["metadata"]["name"] for o in await reader.versions("ns", "chat")] == ["v1"]
    assert [o["metadata"]["name"] for o in await reader.pods("ns", "chat")] == ["chat-a"]
    assert await reader.pods("ns", "other") == [] and await reader.versions("elsewhere", "chat") == []
    assert pool_of_version(wv("v1", "chat")) == "chat" and pool_of_version({"spec": {}}) is None


def test_view_cache_parses_once_per_resource_version(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real = snapshot.version_view

    def counting(obj: Any) -> Any:
        parsed.append(obj["metadata"]["name"])
        return real(obj)

    monkeypatch.setattr(snapshot, "version_view", counting)
    cache = ViewCache()
    history = [wv(f"v{i}", "chat") for i in range(50)]
    for _ in range(3):  # three reconciles over an unchanged history: each version parsed once
        views = [cache.view(o) for o in history]
    assert len(parsed) == 50 and [v.name for v in views] == [f"v{i}" for i in range(50)]
    changed = wv("v3", "chat", rv="2")
    assert cache.view(changed) is not views[3] and parsed[-1] == "v3"  # a new resourceVersion: parsed
    cache.keep(history[:10])  # the others were deleted (pruned): forgotten
    assert len(cache) == 10


def status(seq: int, serving: str | None = None) -> protocol.AgentStatus:
    return protocol.AgentStatus(pod="p", serving_version=serving, ready=True, sequence=seq)


def test_agent_watch_wakes_on_changes_only() -> None:
    assert not differs(status(3), status(3)) and not differs(None, None)
    assert differs(status(3), status(4)) and differs(None, status(0)) and differs(status(0), None)
    # an agent that restarted with the same sequence but another state still counts
    assert differs(status(1, serving="v1"), status(1))


def test_retry_backoff_doubles_and_is_capped() -> None:
    assert [retry_after(n) for n in (1, 2, 3)] == [RETRY_MIN_S, RETRY_MIN_S * 2, RETRY_MIN_S * 4]
    assert retry_after(50) == RETRY_MAX_S
