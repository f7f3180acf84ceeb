"""The trainer SDK's Publisher against a real apiserver (the CRDs from crds/, no operator running):
what it creates, what it refuses at once, and how `wait` and the memory's release follow the
WeightVersion's phase (set here through the status subresource, as the operator would)."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from multiprocessing.connection import Connection
from typing import Any

import pytest
from hotswap_api import protocol
from hotswap_api.resources import TrainerSourceRef
from hotswap_trainer import Publisher, PublishError, PublishFailed
from kubernetes import client

pytestmark = pytest.mark.cluster

GROUP, VERSION = "hotswap.dev", "v1alpha1"
HOST = "127.0.0.1"


def _tensors(seed: int) -> list[tuple[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [("lm_head.weight", torch.randn(32, 16, generator=g)), ("norm.weight", torch.ones(16))]


@pytest.fixture
def custom(kube_api: client.ApiClient, crds: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api)


@pytest.fixture
def pool(custom: client.CustomObjectsApi, namespace: str) -> str:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": "chat"},
        "spec": {
            "replicas": 0,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "vllm-cpu"}]}},
            "model": {"path": "models/base"},
            "checkpointVolume": {"source": {"hostPath": {"path": "/data/ckpts"}}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", body)
    return "chat"


def _set_phase(custom: client.CustomObjectsApi, ns: str, name: str, phase: str, message: str = "") -> None:
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, "weightversions", name, {"status": {"phase": phase, "message": message}}
    )


def test_a_missing_pool_fails_at_once(kube_api: client.ApiClient, crds: None, namespace: str) -> None:
    with pytest.raises(PublishError, match=f"InferencePool nope does not exist in namespace {namespace}"):
        Publisher("nope", namespace, local_hostname=HOST, api_client=kube_api)


def test_publish_creates_the_version_and_follows_its_phase(
    kube_api: client.ApiClient, custom: client.CustomObjectsApi, namespace: str, pool: str
) -> None:
    with Publisher(pool, namespace, local_hostname=HOST, api_client=kube_api, pinned=False) as pub:
        h1 = pub.publish("s1", _tensors(1))
        wv = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "chat-s1")
        ref = TrainerSourceRef.model_validate(wv["spec"]["source"]["trainer"])
        trainer = protocol.TrainerSource.model_validate(ref.model_dump())  # what the agents get
        assert [t.name for t in trainer.tensors] == ["lm_head.weight", "norm.weight"]
        assert trainer.parts[0].endpoint == pub.memory.endpoint
        assert "path" not in wv["spec"]["source"]

        # a reused version is refused before any memory is touched
        with pytest.raises(PublishError, match="chat-s1 already exists"):
            pub.publish("s1", _tensors(2))
        assert pub.versions == ("s1",) and pub.memory.versions == ("s1",)

        h2 = pub.publish("s2", _tensors(2))
        # at the cap (2) with neither version done, a third is refused with the reason
        with pytest.raises(PublishError, match="still rolling out"):
            pub.publish("s3", _tensors(3))

        _set_phase(custom, namespace, "chat-s1", "Failed", "pod chat-x could not stage s1: trainer gone")
        with pytest.raises(PublishFailed, match="could not stage s1: trainer gone"):
            h1.wait(timeout=30)
        assert pub.versions == ("s2",)  # a failed version is released

        _set_phase(custom, namespace, "chat-s2", "Complete")
        h2.wait(timeout=30)
        assert h2.seconds is not None and h2.seconds > 0
        h3 = pub.publish("s3", _tensors(3))
        _set_phase(custom, namespace, "chat-s3", "Complete")
        h3.wait(timeout=30)
        assert pub.versions == ("s3",)  # s2 went once the newer s3 was Complete
        assert pub.memory.allocations == 2  # three versions in two buffers


def _rank_main(rank: int, port: int, kubeconfig: str, namespace: str, pool: str, conn: Connection) -> None:
    """One trainer rank of two (gloo): its share of r1, then a share that overlaps the other's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{HOST}:{port}", rank=rank, world_size=2)
    try:
        with Publisher(pool, namespace, local_hostname=HOST, kubeconfig=kubeconfig, pinned=False) as pub:
            tensors = _tensors(1)
            pub.publish("r1", [tensors[rank]])
            try:
                pub.publish("r2", [tensors[0]])  # both ranks: the same tensor
                overlap = ""
            except PublishError as e:
                overlap = str(e)
            conn.send_bytes(json.dumps({"held": list(pub.versions), "overlap": overlap}).encode())
    finally:
        dist.destroy_process_group()


def test_two_ranks_publish_one_version_and_agree_on_refusals(
    hotswap_cluster: Any, custom: client.CustomObjectsApi, namespace: str, pool: str
) -> None:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    pipes, procs = [], []
    for rank in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_rank_main,
            args=(rank, port, hotswap_cluster.kubeconfig, namespace, pool, child),
            daemon=True,
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        results = []
        for rank, parent in enumerate(pipes):
            assert parent.poll(180), f"rank {rank} did not report"
            results.append(json.loads(parent.recv_bytes()))
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    wv = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "chat-r1")
    trainer = wv["spec"]["source"]["trainer"]
    assert len({p["endpoint"] for p in trainer["parts"]}) == 2  # one part per rank
    assert [t["name"] for t in trainer["tensors"]] == ["lm_head.weight", "norm.weight"]
    # the overlap is refused on both ranks alike, nothing created, r2's memory released everywhere
    for r in results:
        assert "is published by ranks 0 and 1" in r["overlap"], r
        assert r["held"] == ["r1"], r
    with pytest.raises(client.ApiException) as e:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "chat-r2")
    assert e.value.status == 404
