"""Version history against the real apiserver: `spec.versionHistoryLimit` prunes the oldest finished
WeightVersions, never the current one nor one in progress, across operator restarts; `hotswap
rollback` works within the history and says which version is the oldest kept beyond it.

No agents: a pool of 0 replicas completes each version at once; one of 1 replica whose pod can never be
scheduled holds a version in progress (Pending). The controller is driven look by look, like the
other tests here; a restart is a fresh `PoolController` (it keeps no state of its own).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from bodies import GROUP, VERSION, pool_body, wv_body
from hotswap_cli.__main__ import run as hotswap
from hotswap_cli.commands import Io
from hotswap_operator.controller import PoolController, Runtime
from hotswap_operator.kube import Kube
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.settings import OperatorSettings
from hotswap_testing.waiting import wait_for_async
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster
MERGE = "application/merge-patch+json"


async def until(
    ctl: Callable[[], PoolController], check: Callable[[], Any], what: str, timeout: float = 30
) -> Any:
    """Reconcile look by look until `check()` is truthy; fails with `what` and the last value."""

    async def probe() -> Any:
        await ctl().reconcile()
        return check()

    return await wait_for_async(probe, timeout, what, interval=0.2)


async def test_history_prunes_the_oldest_and_rollback_works_within_it(
    kube_api: client.ApiClient, namespace: str, crds: None, hotswap_cluster: Any
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    core = client.CoreV1Api(kube_api)
    kube = Kube(kube_api)

    def versions() -> dict[str, str]:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions")["items"]
        return {o["spec"]["version"]: (o.get("status") or {}).get("phase", "") for o in items}

    def pool() -> dict[str, Any]:
        out: dict[str, Any] = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", "chat"
        )
        return out

    def pruned_events() -> list[str]:
        return sorted(
            e.message
            for e in core.list_namespaced_event(namespace).items
            if e.reason == "VersionsPruned" and e.involved_object.name == "chat"
        )

    def cli(*args: str) -> tuple[int, str]:
        err = io.StringIO()
        argv = [*args, "chat", "-n", namespace, "--kubeconfig", hotswap_cluster.kubeconfig]
        code = hotswap(argv, Io(out=io.StringIO(), err=err))
        return code, err.getvalue()

    # The field's schema: a default (10) and a minimum (0).
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", pool_body(0))
    assert pool()["spec"]["versionHistoryLimit"] == 10
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", "chat", {"spec": {"versionHistoryLimit": -1}}
        )
    assert refused.value.status == 422 and "versionHistoryLimit" in str(refused.value.body)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "inferencepools", "chat", {"spec": {"versionHistoryLimit": 2}}
    )

    controllers = [
        PoolController(
            Runtime(kube=kube, metrics=OperatorMetrics(), settings=OperatorSettings()), namespace, "chat"
        )
    ]
    current = lambda: controllers[-1]  # noqa: E731
    try:
        # v1..v4 complete one after the other (an empty pool takes each at once); the limit keeps two
        # finished versions besides the current v4: v1 goes.
        for v in ("v1", "v2", "v3", "v4"):
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body(v))
            await until(current, lambda v=v: versions().get(v) == "Complete", f"{v} complete")
        await until(current, lambda: versions() == dict.fromkeys(("v2", "v3", "v4"), "Complete"), "v1 pruned")
        assert pool()["status"]["currentVersion"] == "v4"
        assert pruned_events() == [
            "deleted 1 finished WeightVersion(s) beyond spec.versionHistoryLimit=2: v1"
        ]

        # Rollback within the history: v2's checkpoint comes back as a new version, which completes;
        # now v2 is the oldest of three finished ones besides the current: it goes.
        code, err = cli("rollback", "--to", "v2")
        assert code == 0, err
        await until(
            current, lambda: pool()["status"].get("currentVersion") == "v2-rollback-1", "rollback current"
        )
        want = {"v3": "Complete", "v4": "Complete", "v2-rollback-1": "Complete"}
        await until(current, lambda: versions() == want, "v2 pruned")
        rolled = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "weightversions", "chat-v2-rollback-1"
        )
        assert rolled["spec"]["source"] == {"path": "ckpts/v2"}

        # Beyond the history: a clear refusal naming the oldest version still kept.
        for gone in ("v1", "v2"):
            code, err = cli("rollback", "--to", gone)
            assert code == 3, err
            assert f"'{gone}' is not in this pool's history" in err, err
            assert (
                "spec.versionHistoryLimit=2" in err
                and "oldest version still kept to roll back to is 'v3'" in err
            )
        code, err = cli("rollback", "--to", "v3")  # within: still fine (not waited for: the pool moves on)
        assert code == 0, err
        await until(current, lambda: pool()["status"].get("currentVersion") == "v3-rollback-1", "v3 back")
        await until(current, lambda: "v3" not in versions(), "v3 pruned")  # v4, v2-rollback-1 kept

        # A version in progress: one replica that never gets scheduled holds v5 Pending.
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", "chat", {"spec": {"replicas": 1}}
        )
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body("v5"))
        await until(current, lambda: versions().get("v5") == "Pending", "v5 pending")

        # The operator restarts, and meanwhile the limit drops to 0: the new one prunes every finished
        # version but the current one, and keeps v5 in progress.
        await controllers[-1].close()
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferencepools", "chat", {"spec": {"versionHistoryLimit": 0}}
        )
        controllers.append(
            PoolController(
                Runtime(kube=kube, metrics=OperatorMetrics(), settings=OperatorSettings()), namespace, "chat"
            )
        )
        await until(current, lambda: versions() == {"v3-rollback-1": "Complete", "v5": "Pending"}, "limit 0")
        assert pool()["status"]["currentVersion"] == "v3-rollback-1"

        # Idempotent: more looks (and another restart) delete nothing more and say nothing more.
        events = pruned_events()
        assert len(events) == 4, events
        assert (
            "deleted 2 finished WeightVersion(s) beyond spec.versionHistoryLimit=0: v4, v2-rollback-1"
            in events
        )
        await controllers[-1].close()
        controllers.append(
            PoolController(
                Runtime(kube=kube, metrics=OperatorMetrics(), settings=OperatorSettings()), namespace, "chat"
            )
        )
        for _ in range(3):
            await current().reconcile()
        assert versions() == {"v3-rollback-1": "Complete", "v5": "Pending"}
        assert pruned_events() == events
        code, err = cli("rollback", "--to", "v4")
        assert code == 3 and "oldest version still kept to roll back to is 'v3-rollback-1'" in err, err
    finally:
        await controllers[-1].close()


async def test_a_delete_spares_an_object_created_again_under_the_same_name(
    kube_api: client.ApiClient, namespace: str, crds: None
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    kube = Kube(kube_api)
    old = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body("v1"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "chat-v1")
    new = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", wv_body("v1"))
    assert not await kube.delete_weight_version(namespace, "chat-v1", old["metadata"]["uid"])  # 409: spared
    assert await kube.get_weight_version(namespace, "chat-v1") is not None
    assert await kube.delete_weight_version(namespace, "chat-v1", new["metadata"]["uid"])
    assert not await kube.delete_weight_version(namespace, "chat-v1", new["metadata"]["uid"])  # 404: gone
