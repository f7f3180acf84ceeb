"""The objects an InferencePool owns, built from its spec: the Deployment and the agent-token Secret.

Pure functions from the pool to Kubernetes objects (plain dicts, as the API takes them); handlers
create or patch what these return.

Why a Deployment (not pods managed directly): scaling, replacement of failed pods, node drains and
`kubectl rollout` for template changes all come from the Deployment controller, and nothing in a
weight update needs the operator to own pod creation: the update happens inside running pods, and
the per-pod facts (served version, readiness gate) are written on the pods themselves. The version
label is therefore *not* part of the template beyond its initial value: relabelling a pod does not
change the ReplicaSet's selector (pool label + pod-template-hash), so no pod is replaced.

What the pod gets, besides the user's template:
- the inference container's command becomes the hotswap launcher (vLLM in-process plus the private
  control socket); its `args` stay as extra vLLM arguments after the model flags the pool sets;
- an engine container running the agent: the pod IP and name from the downward API, the token from
  the pool's Secret, the base checkpoint and the allowed root inside the checkpoint mount;
- an emptyDir (memory) at `/run/hotswap` shared by both containers: the control socket, the ZeroMQ
  hand-off socket, and on CPU the shared-memory slots of the hand-off;
- the checkpoint volume, read-only, at `checkpointVolume.mountPath` in both containers;
- the readiness gate `hotswap.dev/weights-ready` (the operator sets it per pod) and the labels
  `hotswap.dev/pool` and `hotswap.dev/weight-version`.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from hotswap_api.labels import BASE_VERSION, POOL_LABEL, READINESS_GATE, VERSION_LABEL
from hotswap_api.resources import (
    API_VERSION,
    Device,
    InferencePoolSpec,
)

from hotswap_operator.settings import AGENT_COMMAND, GPU_SHARING_MODES, LAUNCHER_COMMAND

Obj = dict[str, Any]

ENGINE_CONTAINER = "hotswap-engine"
RUN_VOLUME = "hotswap-run"
CHECKPOINT_VOLUME = "hotswap-checkpoints"
RUN_DIR = "/run/hotswap"
CONTROL_SOCKET = f"{RUN_DIR}/control.sock"
HANDOFF_ENDPOINT = f"ipc://{RUN_DIR}/handoff.sock"
TOKEN_KEY = "token"
AGENT_PORT_NAME = "hotswap-agent"
MANAGED_BY = {"app.kubernetes.io/managed-by": "hotswap-operator"}


class WorkloadError(ValueError):
    """The pool's template cannot be turned into a workload (the message says why)."""


def token_secret_name(pool: str) -> str:
    return f"{pool}-agent-token"


def owner_reference(pool: str, uid: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePool",
        "name": pool,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pool_selector(pool: str) -> dict[str, str]:
    return {POOL_LABEL: pool}


def build_token_secret(pool: str, namespace: str, uid: str, token: str) -> Obj:
    """The per-pool Secret holding the agents' bearer token (the operator generates the token)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": token_secret_name(pool),
            "namespace": namespace,
            "labels": {**pool_selector(pool), **MANAGED_BY},
            "ownerReferences": [owner_reference(pool, uid)],
        },
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def inference_container_index(spec: InferencePoolSpec) -> int:
    containers = spec.template.spec.containers
    if spec.inference_container is None:
        return 0
    for i, c in enumerate(containers):
        if c.name == spec.inference_container:
            return i
    names = ", ".join(c.name for c in containers)
    raise WorkloadError(f"inferenceContainer {spec.inference_container!r} is not in the template ({names})")


def _merge_volume_mounts(container: Obj, mounts: list[Obj]) -> None:
    ours = {m["name"] for m in mounts}
    paths = {m["mountPath"] for m in mounts}
    kept = [m for m in container.get("volumeMounts") or [] if m["name"] not in ours]
    clash = [m["mountPath"] for m in kept if m.get("mountPath") in paths]
    if clash:
        raise WorkloadError(f"container {container['name']!r} already mounts something at {clash[0]}")
    container["volumeMounts"] = kept + mounts


def _launcher_args(spec: InferencePoolSpec, user_args: list[str]) -> list[str]:
    model_path = f"{spec.checkpoint_volume.mount_path.rstrip('/')}/{spec.model.path}"
    args = [
        "--control-socket",
        CONTROL_SOCKET,
        model_path,  # vllm serve's positional MODEL (the launcher also adds the worker extension)
        "--tensor-parallel-size",
        str(spec.model.tensor_parallel_size),
    ]
    if spec.model.served_model_name:
        args += ["--served-model-name", spec.model.served_model_name]
    return args + list(user_args)


def engine_container(
    spec: InferencePoolSpec, pool: str, default_image: str | None, command: tuple[str, ...] = AGENT_COMMAND
) -> Obj:
    eng = spec.engine
    mount = spec.checkpoint_volume.mount_path.rstrip("/")
    image = eng.image or default_image
    if not image:
        raise WorkloadError("spec.engine.image is empty and the inference container has no image")
    container: Obj = {
        "name": ENGINE_CONTAINER,
        "image": image,
        "command": list(command),
        "args": [
            "--pod-name=$(POD_NAME)",
            "--host=$(POD_IP)",
            f"--port={eng.port}",
            f"--base-checkpoint={mount}/{spec.model.path}",
            f"--allowed-root={mount}",
            f"--control-socket={CONTROL_SOCKET}",
            f"--handoff-endpoint={HANDOFF_ENDPOINT}",
            f"--workers={spec.model.tensor_parallel_size}",
            f"--device={eng.device.torch}",
            f"--shm-dir={RUN_DIR}",
            f"--p2p-protocol={eng.transport.p2p_protocol.mooncake}",
            f"--collective-timeout={eng.transport.collective_timeout_seconds}",
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "HOTSWAP_AGENT_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": token_secret_name(pool), "key": TOKEN_KEY}},
            },
        ],
        "ports": [{"name": AGENT_PORT_NAME, "containerPort": eng.port, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": eng.port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    if eng.device is Device.CUDA:
        # One rank worker per GPU of the pod, one GPU per vLLM TP worker: the same count on every pod
        # of the pool (the group's layout is pods x GPUs), whatever else the container can see.
        container["args"].append(f"--gpus={spec.model.tensor_parallel_size}")
    if eng.transport.p2p_device:
        container["args"].append(f"--p2p-device={eng.transport.p2p_device}")
    if eng.resources:
        container["resources"] = copy.deepcopy(eng.resources)
    return container


def build_pod_template(
    spec: InferencePoolSpec,
    pool: str,
    gpu_sharing: str = "none",
    commands: tuple[tuple[str, ...], tuple[str, ...]] = (AGENT_COMMAND, LAUNCHER_COMMAND),
) -> Obj:
    """The pod template of the Deployment: the user's template plus everything hotswap needs.

    `gpu_sharing` says how the engine container sees the inference container's GPUs (the operator's
    `gpu_sharing` setting; trade-offs in charts/hotswap/README.md): "dra" gives it the inference
    container's ResourceClaims, "visibleDevices" sets NVIDIA_VISIBLE_DEVICES=all on it, "none" adds
    nothing (CPU pools, or templates that arrange it themselves). `commands` are the engine's and the
    inference container's commands (the operator's `engine_command` and `inference_command`: the
    agent and the launcher unless a simulated fleet replaces them)."""
    if gpu_sharing not in GPU_SHARING_MODES:
        raise WorkloadError(f"unknown GPU sharing mode {gpu_sharing!r}; one of {GPU_SHARING_MODES}")
    template = spec.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    metadata: Obj = template.setdefault("metadata", {})
    labels = metadata.setdefault("labels", {})
    labels.update(pool_selector(pool))
    labels[VERSION_LABEL] = BASE_VERSION  # what a new pod serves; the operator relabels it in place
    pod: Obj = template["spec"]
    containers: list[Obj] = pod["containers"]
    if any(c["name"] == ENGINE_CONTAINER for c in containers):
        raise WorkloadError(f"the template already has a container named {ENGINE_CONTAINER!r}")

    idx = inference_container_index(spec)
    inference = containers[idx]
    engine_command, inference_command = commands
    inference["command"] = list(inference_command)
    inference["args"] = _launcher_args(spec, inference.get("args") or [])

    mounts: list[Obj] = [
        {"name": RUN_VOLUME, "mountPath": RUN_DIR},
        {"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint_volume.mount_path, "readOnly": True},
    ]
    _merge_volume_mounts(inference, copy.deepcopy(mounts))
    engine = engine_container(spec, pool, inference.get("image"), engine_command)
    _merge_volume_mounts(engine, copy.deepcopy(mounts))
    _share_gpus(engine, inference, gpu_sharing)
    containers.append(engine)

    ours = {RUN_VOLUME, CHECKPOINT_VOLUME}
    volumes = [v for v in pod.get("volumes") or [] if v.get("name") not in ours]
    volumes.append({"name": RUN_VOLUME, "emptyDir": {"medium": "Memory"}})
    volumes.append({"name": CHECKPOINT_VOLUME, **_read_only(spec.checkpoint_volume.source)})
    pod["volumes"] = volumes

    gates = [g for g in pod.get("readinessGates") or [] if g.get("conditionType") != READINESS_GATE]
    pod["readinessGates"] = [*gates, {"conditionType": READINESS_GATE}]
    return template


def _share_gpus(engine: Obj, inference: Obj, mode: str) -> None:
    """Let the engine container reach the GPUs of the inference container (CUDA IPC, NCCL)."""
    if mode == "dra":
        claims = (inference.get("resources") or {}).get("claims") or []
        resources = engine.setdefault("resources", {})
        if claims and not resources.get("claims"):
            resources["claims"] = copy.deepcopy(claims)
    elif mode == "visibleDevices":
        env: list[Obj] = engine.setdefault("env", [])
        if not any(e.get("name") == "NVIDIA_VISIBLE_DEVICES" for e in env):
            env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})


def _read_only(source: dict[str, dict[str, Any]]) -> Obj:
    """The volume source, read-only where the source type has the flag (PVCs, NFS, CSI, ...)."""
    out = copy.deepcopy(source)
    for kind, body in out.items():
        if kind in ("persistentVolumeClaim", "nfs", "csi", "iscsi", "cephfs", "rbd", "azureFile"):
            body["readOnly"] = True
    return out


def build_deployment(
    spec: InferencePoolSpec,
    pool: str,
    namespace: str,
    uid: str,
    gpu_sharing: str = "none",
    commands: tuple[tuple[str, ...], tuple[str, ...]] = (AGENT_COMMAND, LAUNCHER_COMMAND),
) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": pool,
            "namespace": namespace,
            "labels": {**pool_selector(pool), **MANAGED_BY},
            "ownerReferences": [owner_reference(pool, uid)],
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": pool_selector(pool)},
            "template": build_pod_template(spec, pool, gpu_sharing, commands),
        },
    }
