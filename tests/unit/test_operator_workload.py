"""The Deployment and Secret an InferencePool owns, as built from its spec."""

from __future__ import annotations

import base64
import os
import re
from typing import Any

import pytest
from hotswap_api.resources import Device, InferencePoolSpec
from hotswap_operator.workload import (
    ENGINE_CONTAINER,
    WorkloadError,
    build_deployment,
    build_token_secret,
)

UID = "0b7c9a4e-1111-2222-3333-444455556666"


def spec(**over: Any) -> InferencePoolSpec:
    raw: dict[str, Any] = {
        "replicas": 2,
        "template": {
            "metadata": {"labels": {"app": "chat"}, "annotations": {"a": "b"}},
            "spec": {
                "containers": [
                    {"name": "sidecar", "image": "busybox", "args": ["sleep", "inf"]},
                    {
                        "name": "vllm",
                        "image": "registry/vllm:1",
                        "command": ["vllm", "serve"],
                        "args": ["--max-model-len", "512"],
                        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                    },
                ],
                "volumes": [{"name": "cache", "emptyDir": {}}],
                "nodeSelector": {"gpu": "h200"},
            },
        },
        "inferenceContainer": "vllm",
        "model": {"path": "models/base", "tensorParallelSize": 2, "servedModelName": "chat"},
        "checkpointVolume": {
            "source": {"persistentVolumeClaim": {"claimName": "ckpts"}},
            "mountPath": "/ckpt",
        },
        "engine": {
            "port": 8700,
            "device": "CPU",
            "transport": {"p2pProtocol": "RDMA", "p2pDevice": "mlx5_0"},
        },
    }
    raw.update(over)
    return InferencePoolSpec.model_validate(raw)


def containers(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def test_deployment_is_owned_by_the_pool_and_selects_its_pods() -> None:
    dep = build_deployment(spec(), "chat", "ml", UID)
    meta = dep["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat", "ml")
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "hotswap.dev/v1alpha1",
        "kind": "InferencePool",
        "name": "chat",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"] == {"matchLabels": {"hotswap.dev/pool": "chat"}}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app": "chat", "hotswap.dev/pool": "chat", "hotswap.dev/weight-version": "base"}
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    # the version label is not in the selector: relabelling a pod must not orphan or replace it
    assert "hotswap.dev/weight-version" not in dep["spec"]["selector"]["matchLabels"]


def test_inference_container_runs_the_launcher_with_model_flags_then_user_args() -> None:
    c = containers(build_deployment(spec(), "chat", "ml", UID))["vllm"]
    assert c["command"] == ["python", "-m", "hotswap_engine.inference.vllm_launcher"]
    assert c["args"] == [
        "--control-socket",
        "/run/hotswap/control.sock",
        "/ckpt/models/base",
        "--tensor-parallel-size",
        "2",
        "--served-model-name",
        "chat",
        "--max-model-len",
        "512",
    ]
    assert c["env"] == [{"name": "HF_HUB_OFFLINE", "value": "1"}]  # the user's fields survive
    assert c["volumeMounts"] == [
        {"name": "cache", "mountPath": "/cache"},
        {"name": "hotswap-run", "mountPath": "/run/hotswap"},
        {"name": "hotswap-checkpoints", "mountPath": "/ckpt", "readOnly": True},
    ]


def test_engine_container_is_injected_with_token_ip_and_roots() -> None:
    cs = containers(build_deployment(spec(), "chat", "ml", UID))
    assert list(cs) == ["sidecar", "vllm", ENGINE_CONTAINER]
    e = cs[ENGINE_CONTAINER]
    assert e["image"] == "registry/vllm:1"  # defaults to the inference image
    assert e["command"] == ["python", "-m", "hotswap_engine.agent"]
    assert e["args"] == [
        "--pod-name=$(POD_NAME)",
        "--host=$(POD_IP)",
        "--port=8700",
        "--base-checkpoint=/ckpt/models/base",
        "--allowed-root=/ckpt",
        "--control-socket=/run/hotswap/control.sock",
        "--handoff-endpoint=ipc:///run/hotswap/handoff.sock",
        "--workers=2",
        "--device=cpu",
        "--shm-dir=/run/hotswap",
        "--p2p-protocol=rdma",
        "--collective-timeout=60",
        "--p2p-device=mlx5_0",
    ]
    env = {v["name"]: v["valueFrom"] for v in e["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HOTSWAP_AGENT_TOKEN"] == {"secretKeyRef": {"name": "chat-agent-token", "key": "token"}}
    assert e["ports"] == [{"name": "hotswap-agent", "containerPort": 8700, "protocol": "TCP"}]
    assert e["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8700}
    assert {"name": "hotswap-checkpoints", "mountPath": "/ckpt", "readOnly": True} in e["volumeMounts"]
    assert cs["sidecar"] == {"name": "sidecar", "image": "busybox", "args": ["sleep", "inf"]}


def test_volumes_and_readiness_gate() -> None:
    pod = build_deployment(spec(), "chat", "ml", UID)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["cache"] == {"name": "cache", "emptyDir": {}}
    assert vols["hotswap-run"] == {"name": "hotswap-run", "emptyDir": {"medium": "Memory"}}
    assert vols["hotswap-checkpoints"] == {
        "name": "hotswap-checkpoints",
        "persistentVolumeClaim": {"claimName": "ckpts", "readOnly": True},
    }
    assert pod["readinessGates"] == [{"conditionType": "hotswap.dev/weights-ready"}]
    assert pod["nodeSelector"] == {"gpu": "h200"}


def test_building_twice_is_stable_and_does_not_touch_the_spec() -> None:
    s = spec()
    before = s.model_dump()
    assert build_deployment(s, "chat", "ml", UID) == build_deployment(s, "chat", "ml", UID)
    assert s.model_dump() == before


def test_first_container_is_the_default_and_engine_image_override() -> None:
    s = spec(inferenceContainer=None, engine={"image": "registry/hotswap-engine:2"})
    cs = containers(build_deployment(s, "chat", "ml", UID))
    assert cs["sidecar"]["command"] == ["python", "-m", "hotswap_engine.inference.vllm_launcher"]
    assert cs[ENGINE_CONTAINER]["image"] == "registry/hotswap-engine:2"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"inferenceContainer": "nope"}, "inferenceContainer 'nope' is not in the template (sidecar, vllm)"),
        (
            {"template": {"spec": {"containers": [{"name": "v", "image": "i"}, {"name": ENGINE_CONTAINER}]}}},
            "already has a container named 'hotswap-engine'",
        ),
        (
            {
                "inferenceContainer": None,
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "v", "image": "i", "volumeMounts": [{"name": "x", "mountPath": "/ckpt"}]}
                        ]
                    }
                },
            },
            "container 'v' already mounts something at /ckpt",
        ),
        (
            {"inferenceContainer": None, "template": {"spec": {"containers": [{"name": "v"}]}}},
            "spec.engine.image is empty",
        ),
    ],
)
def test_templates_that_cannot_work_are_refused_with_a_reason(over: dict[str, Any], message: str) -> None:
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_deployment(spec(**over), "chat", "ml", UID)


def test_token_secret() -> None:
    sec = build_token_secret("chat", "ml", UID, "s3cret")
    assert sec["metadata"]["name"] == "chat-agent-token"
    assert sec["metadata"]["ownerReferences"][0]["uid"] == UID
    assert base64.b64decode(sec["data"]["token"]) == b"s3cret"


# Agent settings the operator leaves to the agent's defaults, and why.
NOT_WRITTEN = {
    "token_file": "the token comes from the pool's Secret as HOTSWAP_AGENT_TOKEN",
    "advertise_address": "defaults to --host, the pod IP",
    "stage_threads": "host tuning for benchmarks, not part of a pool's spec: the agent's default",
    "stage_prefault": "host tuning for benchmarks, not part of a pool's spec: the agent's default",
    "max_status_wait": "the operator's long-polls ask for less than the cap; tests shorten it",
}


def agent_settings(engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, set[str]]:
    """The engine container's command line and environment, as the agent reads them, and the
    settings the operator wrote (by field name)."""
    from hotswap_engine.agent.settings import ENV_PREFIX, load

    downward = {"POD_NAME": "chat-abc", "POD_IP": "127.0.0.21"}  # what the kubelet expands $(VAR) with
    argv = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: downward[m.group(1)], a) for a in engine["args"]]
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    written = set()
    for var in engine["env"]:
        if var["name"].startswith(ENV_PREFIX):
            # a secretKeyRef (the token) resolves to some value; a plain value is taken as it is
            monkeypatch.setenv(var["name"], var.get("value", "secret-from-the-pool"))
            written.add(var["name"].removeprefix(ENV_PREFIX).lower())
    for arg in argv:
        assert arg.startswith("--") and "=" in arg, f"not a --flag=value: {arg}"
        written.add(arg[2:].partition("=")[0].replace("-", "_"))
    return load(argv), written


def test_every_agent_setting_the_operator_writes_reaches_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The injected command line and environment parse with the agent's own settings class, every
    setting is either written or deliberately left to its default, and each written value is the
    pool's."""
    from hotswap_engine.agent.settings import AgentSettings

    cpu = containers(build_deployment(spec(), "chat", "ml", UID))[ENGINE_CONTAINER]
    cfg, written = agent_settings(cpu, monkeypatch)
    assert (cfg.pod_name, cfg.host, cfg.port, cfg.advertise_address) == (
        "chat-abc",
        "127.0.0.21",
        8700,
        "127.0.0.21",
    )
    assert str(cfg.base_checkpoint) == "/ckpt/models/base" and [str(r) for r in cfg.allowed_root] == ["/ckpt"]
    assert (cfg.workers, cfg.device, cfg.p2p_protocol, cfg.p2p_device) == (2, "cpu", "rdma", "mlx5_0")
    assert str(cfg.control_socket) == "/run/hotswap/control.sock" and cfg.collective_timeout == 60.0
    assert cfg.handoff_endpoint == "ipc:///run/hotswap/handoff.sock" and str(cfg.shm_dir) == "/run/hotswap"
    assert cfg.bearer_token == "secret-from-the-pool" and cfg.gpus is None

    gpu_spec = spec()
    gpu_spec.engine.device = Device.CUDA
    gpu_spec.engine.transport.collective_timeout_seconds = 17
    gpu = containers(build_deployment(gpu_spec, "chat", "ml", UID))[ENGINE_CONTAINER]
    cfg, written_gpu = agent_settings(gpu, monkeypatch)
    assert (cfg.device, cfg.gpus, cfg.collective_timeout) == ("cuda", 2, 17.0)

    fields = set(AgentSettings.model_fields)
    assert (written | written_gpu) <= fields
    assert fields - written - written_gpu == set(NOT_WRITTEN), "a new agent setting: write it or say why not"


def test_gpu_sharing_modes_give_the_engine_the_inference_containers_gpus() -> None:
    s = spec()
    tpl = s.template.model_dump(mode="json", by_alias=True, exclude_none=True)
    tpl["spec"]["containers"][1]["resources"] = {"claims": [{"name": "gpus"}]}
    tpl["spec"]["resourceClaims"] = [{"name": "gpus", "resourceClaimTemplateName": "two-h200"}]
    s = spec(template=tpl)

    plain = containers(build_deployment(s, "chat", "ns", UID))[ENGINE_CONTAINER]
    assert "claims" not in plain.get("resources", {})
    assert "--gpus=2" not in plain["args"]  # this spec's engine runs on cpu
    cuda = spec(template=tpl)
    cuda.engine.device = Device.CUDA
    gpu_args = containers(build_deployment(cuda, "chat", "ns", UID, "dra"))[ENGINE_CONTAINER]["args"]
    assert "--device=cuda" in gpu_args and "--gpus=2" in gpu_args  # a rank worker per TP GPU
    assert all(e["name"] != "NVIDIA_VISIBLE_DEVICES" for e in plain["env"])

    dra = containers(build_deployment(s, "chat", "ns", UID, "dra"))[ENGINE_CONTAINER]
    assert dra["resources"]["claims"] == [{"name": "gpus"}]  # the same claim: the same GPUs

    env = containers(build_deployment(s, "chat", "ns", UID, "visibleDevices"))[ENGINE_CONTAINER]["env"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in env

    with pytest.raises(WorkloadError, match="GPU sharing mode"):
        build_deployment(s, "chat", "ns", UID, "sideways")
