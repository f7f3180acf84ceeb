"""The Node object: registration, status, and the Lease heartbeat the node controller watches."""

from __future__ import annotations

import platform
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .kubeapi import ApiError, KubeApi

Obj = dict[str, Any]
KUBELET_VERSION = "v1.35.4-hotswap"


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def now_micro() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


@dataclass
class NodeConfig:
    name: str
    host_ip: str
    cpu: str
    memory: str
    gpus: int
    max_pods: int = 110

    def labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "hotswap-local",
        }

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.max_pods),
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.gpus),
        }


class NodeAgent:
    def __init__(self, api: KubeApi, cfg: NodeConfig) -> None:
        self.api = api
        self.cfg = cfg
        self.boot_id = str(uuid.uuid4())

    def register(self) -> None:
        path = f"/api/v1/nodes/{self.cfg.name}"
        if self.api.get_or_none(path) is None:
            try:
                self.api.create(
                    "/api/v1/nodes",
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": self.cfg.name, "labels": self.cfg.labels()},
                    },
                )
            except ApiError as e:
                if e.status != 409:
                    raise
        else:
            self.api.strategic_patch(path, {"metadata": {"labels": self.cfg.labels()}})
        self.report_status()
        self.renew_lease()

    def report_status(self) -> None:
        now = now_rfc3339()

        def cond(ctype: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }

        status: Obj = {
            "capacity": self.cfg.capacity(),
            "allocatable": self.cfg.capacity(),
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond(
                    "PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"
                ),
                cond("Ready", "True", "KubeletReady", "hotswap local kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.cfg.host_ip},
                {"type": "Hostname", "address": self.cfg.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "hotswap",
                "systemUUID": "hotswap",
                "bootID": self.boot_id,
                "kernelVersion": platform.release(),
                "osImage": "hotswap local processes",
                "containerRuntimeVersion": "hotswap://0.1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        # lastTransitionTime is only meaningful on change; the apiserver keeps what we send, which
        # is fine for a node that is Ready for its whole life.
        node = self.api.get(f"/api/v1/nodes/{self.cfg.name}")
        old = {c["type"]: c for c in node.get("status", {}).get("conditions") or []}
        for c in status["conditions"]:
            prev = old.get(c["type"])
            if prev is not None and prev.get("status") == c["status"]:
                c["lastTransitionTime"] = prev.get("lastTransitionTime", now)
        self.api.strategic_patch(f"/api/v1/nodes/{self.cfg.name}/status", {"status": status})

    def renew_lease(self, duration: int = 40) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.cfg.name}"
        spec = {"holderIdentity": self.cfg.name, "leaseDurationSeconds": duration, "renewTime": now_micro()}
        if self.api.get_or_none(path) is None:
            node = self.api.get(f"/api/v1/nodes/{self.cfg.name}")
            try:
                self.api.create(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {
                            "name": self.cfg.name,
                            "ownerReferences": [
                                {
                                    "apiVersion": "v1",
                                    "kind": "Node",
                                    "name": self.cfg.name,
                                    "uid": node["metadata"]["uid"],
                                }
                            ],
                        },
                        "spec": spec,
                    },
                )
                return
            except ApiError as e:
                if e.status != 409:
                    raise
        self.api.merge_patch(path, {"spec": spec})
