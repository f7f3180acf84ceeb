"""The few Kubernetes calls the operator makes, as plain-dict async functions.

The official client is synchronous; each call runs in a thread so kopf's event loop keeps going.
Answers are read raw (`_preload_content=False`) and parsed as JSON, so the code sees the API's own
camelCase objects — the same shapes kopf hands to handlers and the models in `resources` parse.
Every PATCH names its content type: this client's default for a dict body is a JSON patch, and a
merge patch on a pod's `status.conditions` would replace the kubelet's conditions.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from hotswap_api.labels import GROUP
from hotswap_api.resources import VERSION
from kubernetes import client
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]
T = TypeVar("T")
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.coord = client.CoordinationV1Api(api)
        # Requests sent, by client method (e.g. "list_namespaced_pod"): what a reconcile costs the
        # apiserver, for metrics and tests. kopf's own watches are not counted (not sent here).
        self.requests: Counter[str] = Counter()
        self.on_request: Callable[[str], None] | None = None

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", "call")
        self.requests[name] += 1
        if self.on_request is not None:
            self.on_request(name)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _json(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        resp = await self._run(fn, *args, _preload_content=False, **kwargs)
        data: Obj = json.loads(resp.data)
        return data

    async def _write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """A write whose answer is not used: read as bytes, never turned into the client's models
        (a pod is ~5-10 ms of CPU to deserialise; a rollout writes a label and a gate per pod, and
        at 100-200 pods that CPU, under the GIL, made each reconcile take seconds)."""
        resp = await self._run(fn, *args, _preload_content=False, **kwargs)
        _ = resp.data  # read to the end: the connection goes back to the pool

    async def _maybe(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj | None:
        try:
            return await self._json(fn, *args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # ---- custom resources ----------------------------------------------------------------------

    async def get_pool(self, ns: str, name: str) -> Obj | None:
        return await self._maybe(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, ns, "inferencepools", name
        )

    async def get_weight_version(self, ns: str, name: str) -> Obj | None:
        return await self._maybe(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, ns, "weightversions", name
        )

    async def list_weight_versions(self, ns: str) -> list[Obj]:
        out = await self._json(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, "weightversions"
        )
        items: list[Obj] = out.get("items", [])
        return items

    async def delete_weight_version(self, ns: str, name: str, uid: str) -> bool:
        """Delete the WeightVersion `name` if it is still the object `uid`; False: it is gone already
        (404) or was created again under that name (409, the uid precondition)."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid) if uid else None)
        try:
            await self._run(
                self.custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                ns,
                "weightversions",
                name,
                body=body,
            )
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    async def patch_status(self, ns: str, plural: str, name: str, status: Obj) -> None:
        await self._write(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            ns,
            plural,
            name,
            {"status": status},
            _content_type=MERGE,
        )

    # ---- pods ----------------------------------------------------------------------------------

    async def list_pods(self, ns: str, selector: str) -> list[Obj]:
        out = await self._json(self.core.list_namespaced_pod, ns, label_selector=selector)
        items: list[Obj] = out.get("items", [])
        return items

    async def label_pod(self, ns: str, name: str, labels: dict[str, str]) -> None:
        body = {"metadata": {"labels": labels}}
        await self._write(self.core.patch_namespaced_pod, name, ns, body, _content_type=STRATEGIC)

    async def set_pod_condition(
        self, ns: str, name: str, type_: str, status: bool, reason: str, message: str
    ) -> None:
        cond = {
            "type": type_,
            "status": "True" if status else "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        body = {"status": {"conditions": [cond]}}  # strategic merge: conditions merge by type
        await self._write(self.core.patch_namespaced_pod_status, name, ns, body, _content_type=STRATEGIC)

    # ---- owned objects -------------------------------------------------------------------------

    async def get_secret(self, ns: str, name: str) -> Obj | None:
        return await self._maybe(self.core.read_namespaced_secret, name, ns)

    async def create_secret(self, ns: str, body: Obj) -> None:
        await self._run(self.core.create_namespaced_secret, ns, body)

    async def get_deployment(self, ns: str, name: str) -> Obj | None:
        return await self._maybe(self.apps.read_namespaced_deployment, name, ns)

    async def create_deployment(self, ns: str, body: Obj) -> None:
        await self._run(self.apps.create_namespaced_deployment, ns, body)

    async def replace_deployment(self, ns: str, name: str, body: Obj) -> None:
        """PUT with the resourceVersion read before: the desired object, exactly (a merge patch would
        keep containers, env entries or volumes the pool no longer asks for)."""
        await self._run(self.apps.replace_namespaced_deployment, name, ns, body)

    # ---- events --------------------------------------------------------------------------------

    async def event(self, involved: Obj, reason: str, message: str, warning: bool, component: str) -> None:
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._write(self.core.create_namespaced_event, meta["namespace"], body)

    # ---- leases (leader election) --------------------------------------------------------------

    async def get_lease(self, ns: str, name: str) -> Obj | None:
        return await self._maybe(self.coord.read_namespaced_lease, name, ns)

    async def create_lease(self, ns: str, body: Obj) -> Obj:
        return await self._json(self.coord.create_namespaced_lease, ns, body)

    async def replace_lease(self, ns: str, name: str, body: Obj) -> Obj:
        """Optimistic: the body carries the resourceVersion read before, so a racing writer gets 409."""
        return await self._json(self.coord.replace_namespaced_lease, name, ns, body)


def is_conflict(e: BaseException) -> bool:
    return isinstance(e, ApiException) and e.status in (409, 422)


def api_status(e: BaseException) -> int | None:
    return e.status if isinstance(e, ApiException) else None
