"""The agent's Prometheus metrics, on a registry of its own so tests can run several agents."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "hotswap_agent_stage_duration_seconds",
            "Duration of each stage of staging and updates",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.bytes_moved = Counter(
            "hotswap_agent_bytes_total",
            "Bytes moved, by path (staging: storage to host; transfer: through the group; handoff: to vLLM)",
            ["path"],
            registry=self.registry,
        )
        self.updates = Counter(
            "hotswap_agent_updates_total", "Updates by outcome", ["outcome"], registry=self.registry
        )
        self.serving = Gauge(
            "hotswap_agent_serving_version_info",
            '1 for the version this pod serves (version="" for the base checkpoint)',
            ["version"],
            registry=self.registry,
        )
        self.staged_bytes = Gauge(
            "hotswap_agent_staged_bytes", "Host memory held by staged versions", registry=self.registry
        )
        self.set_serving(None)

    def set_serving(self, version: str | None) -> None:
        # One child at a time: the info gauge names the current version only.
        self.serving.clear()
        self.serving.labels(version or "").set(1)
