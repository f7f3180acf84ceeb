"""Waiting on cluster state with a timeout and a failure message that shows why it did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client

from .diagnostics import control_plane_logs, describe_namespace, describe_object

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    explain: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> T:
    """Calls `probe` until it returns something truthy; raises WaitTimeout with `explain()` after
    `timeout` seconds. API errors inside the probe count as 'not yet' (they are shown at the end)."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = probe()
            if value:
                return value
        except client.ApiException as e:
            last_error = f"{e.status} {e.reason}: {str(e.body)[:300]}"
        if time.monotonic() >= deadline:
            detail = explain() if explain else ""
            err = f"\nlast API error: {last_error}" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}{err}\n{detail}")
        time.sleep(interval)


class Waiter:
    """Waits bound to one namespace: failures print its events, pods and pod logs."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)

    def explain(self, obj: Callable[[], Any] | None = None) -> Callable[[], str]:
        def text() -> str:
            parts = []
            if obj is not None:
                try:
                    parts.append("--- object\n" + describe_object(obj()))
                except client.ApiException as e:
                    parts.append(f"<object: {e.status} {e.reason}>")
            parts.append(describe_namespace(self.api, self.namespace))
            parts.append(control_plane_logs())
            return "\n".join(parts)

        return text

    def until(
        self,
        probe: Callable[[], T | None],
        what: str,
        timeout: float = 60,
        obj: Callable[[], Any] | None = None,
    ) -> T:
        return wait_for(probe, timeout, what, self.explain(obj))

    def pods(self, selector: str = "") -> list[Any]:
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def pod(self, name: str) -> Any:
        return self.core.read_namespaced_pod(name, self.namespace)

    @staticmethod
    def is_ready(pod: Any) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    def pod_ready(self, name: str, timeout: float = 60) -> Any:
        return self.until(
            lambda: (p := self.pod(name)) and self.is_ready(p) and p,
            f"pod {name} Ready",
            timeout,
            lambda: self.pod(name),
        )

    def ready_pods(self, selector: str, count: int, timeout: float = 60) -> list[Any]:
        """Exactly `count` pods match `selector`, none terminating, all Ready."""

        def probe() -> list[Any] | None:
            pods = [p for p in self.pods(selector) if p.metadata.deletion_timestamp is None]
            all_pods = self.pods(selector)
            if len(all_pods) == count and len(pods) == count and all(self.is_ready(p) for p in pods):
                return pods
            return None

        return self.until(probe, f"{count} Ready pods matching {selector!r}", timeout)

    def deployment_available(self, name: str, replicas: int, timeout: float = 90) -> Any:
        def probe() -> Any | None:
            d: Any = self.apps.read_namespaced_deployment(name, self.namespace)
            st = d.status
            ok = (
                st.observed_generation == d.metadata.generation
                and st.available_replicas == replicas
                and st.ready_replicas == replicas
                and (st.replicas or 0) == replicas
            )
            return d if ok else None

        return self.until(
            probe,
            f"deployment {name} with {replicas} available replicas",
            timeout,
            lambda: self.apps.read_namespaced_deployment(name, self.namespace).status,
        )
