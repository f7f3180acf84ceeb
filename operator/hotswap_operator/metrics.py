"""Prometheus metrics of the operator: rollout durations per stage, pods per serving version, failures.

`OperatorMetrics.observe(fleet, plan)` derives everything from what the planner saw and decided, so
the numbers are the ones written into the statuses (no second bookkeeping to drift).
"""

from __future__ import annotations

from hotswap_api.labels import BASE_VERSION
from hotswap_api.resources import Phase
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from hotswap_operator.planner import Fleet, Plan

BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.stage_seconds = Histogram(
            "hotswap_operator_rollout_stage_seconds",
            "Seconds per stage of completed rollouts (slowest pod): staging, transfer, reload, total",
            ["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.rollouts = Counter(
            "hotswap_operator_rollouts_total",
            "WeightVersions that reached a terminal phase",
            ["phase"],
            registry=self.registry,
        )
        self.failures = Counter(
            "hotswap_operator_rollout_failures_total",
            "Failed WeightVersions and failed broadcast attempts, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.pods_serving = Gauge(
            "hotswap_operator_pods_serving",
            "Pods by the weight version their agent reports serving",
            ["namespace", "pool", "version"],
            registry=self.registry,
        )
        self.actions = Counter(
            "hotswap_operator_actions_total",
            "Actions the operator executed, by kind and outcome",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.apiserver_requests = Counter(
            "hotswap_operator_apiserver_requests_total",
            "Requests the operator sent the apiserver (not kopf's watches), by client call",
            ["call"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "hotswap_operator_reconciles_total",
            "Reconciles of pools (each reads from the watch-fed caches, not by LIST)",
            registry=self.registry,
        )
        # Summary, not Histogram: scale runs read exact sum/count deltas per reconcile (bench/scale.py).
        self.reconcile_seconds = Summary(
            "hotswap_operator_reconcile_seconds",
            "Seconds one reconcile of a pool took (read, plan, write statuses, run its quick actions)",
            registry=self.registry,
        )
        self._seen_versions: dict[tuple[str, str], set[str]] = {}

    def count_request(self, call: str) -> None:
        self.apiserver_requests.labels(call).inc()

    def observe(self, namespace: str, fleet: Fleet, plan: Plan) -> None:
        before = {v.name: v.status for v in fleet.versions}
        for name, st in plan.version_statuses.items():
            old = before.get(name)
            if old is not None and old.phase == st.phase:
                continue
            if st.phase.terminal:
                self.rollouts.labels(st.phase.value).inc()
            if st.phase is Phase.COMPLETE and st.stage_durations is not None:
                d = st.stage_durations
                for stage, seconds in (
                    ("staging", d.staging),
                    ("transfer", d.transfer),
                    ("reload", d.reload),
                ):
                    if seconds is not None:
                        self.stage_seconds.labels(stage).observe(seconds)
                if st.start_time and st.completion_time:
                    self.stage_seconds.labels("total").observe(
                        (st.completion_time - st.start_time).total_seconds()
                    )
            if st.phase is Phase.FAILED:
                applied = next((c for c in st.conditions if c.type == "Applied"), None)
                self.failures.labels(applied.reason if applied else "Unknown").inc()
        for e in plan.actions:
            if getattr(e, "reason", None) == "Retrying":
                self.failures.labels("AttemptFailed").inc()
        counts: dict[str, int] = {}
        for pod in fleet.pods:
            if pod.agent is not None and not pod.deleting:
                v = pod.serving or BASE_VERSION
                counts[v] = counts.get(v, 0) + 1
        key = (namespace, fleet.pool)
        for gone in self._seen_versions.get(key, set()) - set(counts):
            self.pods_serving.remove(namespace, fleet.pool, gone)
        for v, n in counts.items():
            self.pods_serving.labels(namespace, fleet.pool, v).set(n)
        self._seen_versions[key] = set(counts)

    def forget_pool(self, namespace: str, pool: str) -> None:
        for v in self._seen_versions.pop((namespace, pool), set()):
            self.pods_serving.remove(namespace, pool, v)
