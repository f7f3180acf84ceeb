"""The SDK's few Kubernetes calls: check the pool, create a WeightVersion, read and watch its phase.

Credentials are the usual ones (an explicit kubeconfig, else $KUBECONFIG / ~/.kube/config, else the
in-cluster ServiceAccount); without any, the Publisher fails at once with a message. The body is
built from the operator's own CRD models, so the SDK cannot write a field the CRD does not have.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from hotswap_api.labels import GROUP
from hotswap_api.resources import (
    VERSION,
    PoolRef,
    SourceRef,
    TrainerSourceRef,
    WeightVersion,
    WeightVersionSpec,
)

from hotswap_trainer.memory import PublishError

POOLS = "inferencepools"
VERSIONS = "weightversions"
REQUEST_TIMEOUT_S = 10.0


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    try:
        data = json.loads(body or "")
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except (TypeError, ValueError):
        pass
    status = getattr(e, "status", None)
    return f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else str(e)


def kubeconfig_path(explicit: str | None) -> str | None:
    """The kubeconfig to use, resolved now (the Kubernetes client reads $KUBECONFIG once, at import):
    `explicit`, else the first existing file of $KUBECONFIG, else ~/.kube/config if it exists."""
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise PublishError(f"no cluster credentials: kubeconfig {explicit} does not exist")
        return explicit
    env = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates = env or [os.path.expanduser("~/.kube/config")]
    return next((p for p in candidates if os.path.isfile(p)), None)


def connect(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An API client from the usual credentials; PublishError when there are none."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig_path(kubeconfig)
    try:
        if path is not None:
            return config.new_client_from_config(config_file=path, context=context)
        config.load_incluster_config()  # a pod's ServiceAccount
        return client.ApiClient()
    except (ConfigException, OSError) as e:
        where = path or "no kubeconfig ($KUBECONFIG, ~/.kube/config) and no in-cluster ServiceAccount"
        raise PublishError(
            f"no cluster credentials: {where}: {e} (set KUBECONFIG, pass kubeconfig=, or run in a pod whose "
            "ServiceAccount may create weightversions)"
        ) from e


class PoolApi:
    """The pool a Publisher publishes to, and its WeightVersions."""

    def __init__(self, api_client: Any, pool: str, namespace: str) -> None:
        from kubernetes import client

        self.client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.pool = pool
        self.namespace = namespace

    def name(self, version: str) -> str:
        return f"{self.pool}-{version}"

    def check_pool(self) -> None:
        """Fail at once, with a message, when the pool is missing or the cluster unreachable."""
        try:
            self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, POOLS, self.pool, _request_timeout=REQUEST_TIMEOUT_S
            )
        except Exception as e:
            if getattr(e, "status", None) == 404:
                raise PublishError(
                    f"InferencePool {self.pool} does not exist in namespace {self.namespace}"
                ) from e
            raise PublishError(
                f"cannot read InferencePool {self.namespace}/{self.pool}: {_message(e)}"
            ) from e

    def get(self, version: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                VERSIONS,
                self.name(version),
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None
            raise PublishError(f"cannot read WeightVersion {self.name(version)}: {_message(e)}") from e
        if not isinstance(obj, dict):
            raise PublishError(f"WeightVersion {self.name(version)}: unexpected answer {type(obj).__name__}")
        return obj

    def body(self, version: str, trainer: TrainerSourceRef, timeout: str) -> dict[str, Any]:
        wv = WeightVersion(
            metadata={"name": self.name(version), "namespace": self.namespace},
            spec=WeightVersionSpec(
                pool_ref=PoolRef(name=self.pool),
                version=version,
                source=SourceRef(trainer=trainer),
                timeout=timeout,
            ),
        )
        body = wv.to_api()
        body.pop("status", None)
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WeightVersion", **body}

    def create(self, body: dict[str, Any]) -> None:
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, VERSIONS, body, _request_timeout=REQUEST_TIMEOUT_S
            )
        except Exception as e:
            if getattr(e, "status", None) == 409:
                raise PublishError(
                    f"WeightVersion {body['metadata']['name']} already exists: a version names one set of "
                    "weights, publish a new version"
                ) from e
            raise PublishError(
                f"the cluster refused WeightVersion {body['metadata']['name']}: {_message(e)}"
            ) from e

    def phase(self, version: str) -> tuple[str | None, str]:
        """(phase, message) of the version's WeightVersion; (None, "") when it does not exist."""
        obj = self.get(version)
        if obj is None:
            return None, ""
        status = obj.get("status") or {}
        return str(status.get("phase") or "Pending"), str(status.get("message") or "")

    def wait_terminal(self, version: str, timeout: float) -> tuple[str, str]:
        """Block until the WeightVersion is Complete, Failed or Superseded (a watch, not polling);
        returns (phase, message). TimeoutError after `timeout` seconds."""
        from kubernetes import watch

        deadline = time.monotonic() + timeout
        name = self.name(version)
        while True:
            obj = self.get(version)
            if obj is None:
                raise PublishError(f"WeightVersion {name} was deleted")
            status = obj.get("status") or {}
            if status.get("phase") in ("Complete", "Failed", "Superseded"):
                return str(status["phase"]), str(status.get("message") or "")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"WeightVersion {name} is still {status.get('phase') or 'Pending'} after {timeout:.0f}s: "
                    f"{status.get('message') or ''}"
                )
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    VERSIONS,
                    field_selector=f"metadata.name={name}",
                    resource_version=obj["metadata"].get("resourceVersion"),
                    timeout_seconds=max(1, min(int(left) + 1, 60)),
                ):
                    st = (event.get("object") or {}).get("status") or {}
                    if event.get("type") == "DELETED" or st.get("phase") in (
                        "Complete",
                        "Failed",
                        "Superseded",
                    ):
                        break
            except Exception as e:  # an expired resourceVersion (410) or a dropped stream: read again
                if getattr(e, "status", None) not in (None, 410):
                    raise PublishError(f"watching WeightVersion {name}: {_message(e)}") from e
            finally:
                w.stop()
