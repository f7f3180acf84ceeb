"""The few API calls the command line makes, with API errors turned into exit codes.

Kubeconfig resolution is the usual one: --kubeconfig, else $KUBECONFIG (its first existing file; no
merging of several), else ~/.kube/config, else the in-cluster ServiceAccount (a pod running the
CLI); --context picks a context.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from hotswap_api.labels import GROUP, POOL_LABEL
from hotswap_api.resources import (
    VERSION,
    InferencePool,
    WeightVersion,
)
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from hotswap_cli.errors import CliError, ExitCode
from hotswap_cli.parsing import Target

Obj = dict[str, Any]
T = TypeVar("T")


def api_message(e: ApiException) -> str:
    """The apiserver's own message (a Status object), else the HTTP reason."""
    try:
        body = json.loads(e.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return f"HTTP {e.status} {e.reason}"


def _translate(e: ApiException, what: str) -> CliError:
    msg = api_message(e)
    if e.status == 404:
        return CliError(ExitCode.NOT_FOUND, f"{what} not found")
    if e.status in (400, 409, 422):
        return CliError(ExitCode.USAGE, msg)
    if e.status in (401, 403):
        return CliError(ExitCode.API, f"not allowed: {msg}")
    return CliError(ExitCode.API, f"{what}: {msg}")


class Cluster:
    def __init__(self, target: Target) -> None:
        self.api, context_namespace = _connect(target)
        self.namespace = target.namespace or context_namespace or "default"
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def close(self) -> None:
        self.api.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            resp = fn(*args, _preload_content=False, **kwargs)
            return json.loads(resp.data)
        except ApiException as e:
            raise _translate(e, what) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            host = self.api.configuration.host
            raise CliError(ExitCode.API, f"cannot reach the Kubernetes API at {host}: {e}") from e

    def get_pool(self, name: str) -> InferencePool:
        obj = self._call(
            f"inferencepool {self.namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            "inferencepools",
            name,
        )
        return InferencePool.model_validate(obj)

    def pool_pods(self, pool: str) -> list[Obj]:
        out = self._call(
            f"pods of {self.namespace}/{pool}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{POOL_LABEL}={pool}",
        )
        items: list[Obj] = out.get("items", [])
        return items

    def pool_versions(self, pool: str) -> list[WeightVersion]:
        out = self._call(
            f"weightversions in {self.namespace}",
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            "weightversions",
        )
        versions = [WeightVersion.model_validate(o) for o in out.get("items", [])]
        return [v for v in versions if v.spec.pool_ref.name == pool]

    def get_version(self, name: str) -> WeightVersion:
        obj = self._call(
            f"weightversion {self.namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            "weightversions",
            name,
        )
        return WeightVersion.model_validate(obj)

    def create_version(self, body: Obj) -> WeightVersion:
        name = body["metadata"]["name"]
        try:
            obj = self._call(
                f"weightversion {self.namespace}/{name}",
                self.custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                "weightversions",
                body,
            )
        except CliError as e:
            if isinstance(e.__cause__, ApiException) and e.__cause__.status == 409:
                version = body["spec"]["version"]
                pool = body["spec"]["poolRef"]["name"]
                raise CliError(
                    ExitCode.USAGE,
                    f"version {version!r} of pool {pool!r} exists already (weightversion {name}); "
                    "a version is never reused: publish under a new version",
                ) from e
            raise
        return WeightVersion.model_validate(obj)


def _connect(target: Target) -> tuple[client.ApiClient, str | None]:
    path = target.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    files = [p for p in path.split(os.pathsep) if p]
    try:
        if any(Path(p).exists() for p in files):
            existing = next(p for p in files if Path(p).exists())
            _, active = config.list_kube_config_contexts(config_file=existing)
            if target.context:
                contexts, _ = config.list_kube_config_contexts(config_file=existing)
                match = [c for c in contexts if c["name"] == target.context]
                if not match:
                    raise CliError(ExitCode.USAGE, f"context {target.context!r} is not in {existing}")
                active = match[0]
            api = config.new_client_from_config(config_file=existing, context=target.context)
            namespace = (active or {}).get("context", {}).get("namespace")
            return api, namespace
        if target.kubeconfig or target.context:
            raise CliError(ExitCode.USAGE, f"kubeconfig {path} does not exist")
        config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else None
    except ConfigException as e:
        raise CliError(ExitCode.USAGE, f"no usable kubeconfig ({path}) and not in a cluster: {e}") from e
