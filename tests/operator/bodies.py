"""Objects the operator tests create: a pool whose pods never schedule (the operator's decisions
run against the real apiserver without engines) and WeightVersions of it."""

from __future__ import annotations

from typing import Any

GROUP, VERSION = "hotswap.dev", "v1alpha1"


def pool_body(replicas: int = 1, name: str = "chat") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "template": {
                "spec": {
                    "containers": [{"name": "vllm", "image": "vllm-cpu"}],
                    "nodeSelector": {"hotswap.dev/test-no-such-node": "true"},
                }
            },
            "model": {"path": "models/base"},
            "checkpointVolume": {"source": {"hostPath": {"path": "/tmp"}}},
            "engine": {"device": "CPU"},
        },
    }


def wv_body(version: str, pool: str = "chat") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightVersion",
        "metadata": {"name": f"{pool}-{version}"},
        "spec": {"poolRef": {"name": pool}, "version": version, "source": {"path": f"ckpts/{version}"}},
    }
