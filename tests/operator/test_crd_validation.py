"""The generated CRDs on a real apiserver: invalid objects are refused with clear messages.

Needs the local cluster (`hotswap_cluster` fixtures). The CRDs are applied from crds/ as checked in.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

pytestmark = pytest.mark.cluster

GROUP, VERSION = "hotswap.dev", "v1alpha1"


@pytest.fixture
def custom(kube_api: client.ApiClient, crds: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api)


def pool(name: str = "chat", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": 2,
        "template": {
            "spec": {"containers": [{"name": "vllm", "image": "vllm-cpu", "args": ["--enforce-eager"]}]}
        },
        "model": {"path": "models/base"},
        "checkpointVolume": {"source": {"hostPath": {"path": "/data/ckpts"}}},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": body,
    }


def wv(version: str = "v1", pool_name: str = "chat", name: str | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "poolRef": {"name": pool_name},
        "version": version,
        "source": {"path": "ckpts/v1"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "WeightVersion",
        "metadata": {"name": name or f"{pool_name}-{version}"},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


# A trainer-held version as the SDK writes it (`hotswap_trainer.Publisher`).
TRAINER: dict[str, Any] = {
    "parts": [
        {
            "endpoint": "127.0.0.1:15000",
            "version": "v1",
            "buffers": [{"segment": 0, "address": 140000000000000, "nbytes": 4096}],
            "layoutAddress": 140000000100000,
            "layoutNbytes": 120,
            "layoutSha256": "0" * 64,
        }
    ],
    "tensors": [
        {"name": "lm_head.weight", "dtype": "BF16", "shape": [32, 16], "fingerprint": "bfloat16:32x16:00"}
    ],
    "checksum": "1" * 64,
}


def create(api: client.CustomObjectsApi, ns: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)
    return out


def refused(api: client.CustomObjectsApi, ns: str, plural: str, body: dict[str, Any]) -> tuple[int, str]:
    with pytest.raises(client.ApiException) as e:
        create(api, ns, plural, body)
    body = json.loads(e.value.body)  # a metav1.Status; its message is what kubectl prints
    return e.value.status, str(body["message"])


def test_valid_objects_are_accepted_with_defaults(custom: client.CustomObjectsApi, namespace: str) -> None:
    p = create(custom, namespace, "inferencepools", pool())
    assert p["spec"]["engine"]["port"] == 8600  # defaulted by the apiserver from the schema
    assert p["spec"]["engine"]["transport"]["p2pProtocol"] == "TCP"
    assert p["spec"]["updatePolicy"] == {"requests": "Keep", "maxAttempts": 3}
    assert p["spec"]["checkpointVolume"]["mountPath"] == "/checkpoints"
    assert p["spec"]["template"]["spec"]["containers"][0]["args"] == ["--enforce-eager"]  # kept, not pruned
    w = create(custom, namespace, "weightversions", wv())
    assert w["spec"]["strategy"] == "Broadcast" and w["spec"]["timeout"] == "10m"
    t = create(custom, namespace, "weightversions", wv("v2", source={"trainer": TRAINER}))
    assert t["spec"]["source"] == {"trainer": TRAINER}  # nothing pruned: the agents get it as written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": None}, "spec.source: Required value"),
        ({"strategy": "fast"}, 'spec.strategy: Unsupported value: "fast"'),
        ({"source": {"path": "/etc/passwd"}}, "source.path must be relative to the pool's checkpoint volume"),
        ({"source": {"path": "ckpts/../../secrets"}}, "source.path must not contain '..'"),
        (
            {"source": {"path": "v1", "sha256Manifest": "../m.json"}},
            "source.sha256Manifest must not contain '..'",
        ),
        ({"source": {}}, "source must name exactly one of path and trainer"),
        (
            {"source": {"path": "ckpts/v1", "trainer": TRAINER}},
            "source must name exactly one of path and trainer",
        ),
        (
            {"source": {"trainer": TRAINER, "sha256Manifest": "m.json"}},
            "source.sha256Manifest applies to a path source only",
        ),
        (
            {"source": {"trainer": {**TRAINER, "checksum": "x"}}},
            "spec.source.trainer.checksum in body should match",
        ),
        ({"timeout": "soon"}, "spec.timeout in body should match"),
        ({"source": {"path": "ckpts/v1\x00"}}, "spec.source.path in body should match"),
        ({"source": {"path": "ckpts/v1\nx"}}, "spec.source.path in body should match"),
        (
            {"source": {"path": "v1", "sha256Manifest": "m\x7f.json"}},
            "spec.source.sha256Manifest in body should match",
        ),
    ],
)
def test_invalid_weight_versions_are_refused(
    custom: client.CustomObjectsApi, namespace: str, change: dict[str, Any], message: str
) -> None:
    status, body = refused(custom, namespace, "weightversions", wv(**change))
    assert status == 422
    assert message in body


def test_reserved_and_malformed_versions(custom: client.CustomObjectsApi, namespace: str) -> None:
    status, body = refused(custom, namespace, "weightversions", wv(version="base"))
    assert status == 422 and "version 'base' is reserved" in body
    status, body = refused(custom, namespace, "weightversions", wv(version="V_2", name="chat-v2"))
    assert status == 422 and "spec.version in body should match" in body


def test_one_weight_version_per_version_and_pool(custom: client.CustomObjectsApi, namespace: str) -> None:
    create(custom, namespace, "weightversions", wv("v7"))
    again = wv("v7", source={"path": "ckpts/other"})
    status, body = refused(custom, namespace, "weightversions", again)
    assert status == 409 and "already exists" in body
    # Under another name the same version is refused by the naming rule, with the name it must have.
    status, body = refused(custom, namespace, "weightversions", wv("v7", name="my-retry"))
    assert status == 422 and "metadata.name must be chat-v7" in body
    # The same version for another pool is a different identity.
    create(custom, namespace, "weightversions", wv("v7", pool_name="other"))


def test_weight_version_spec_is_immutable(custom: client.CustomObjectsApi, namespace: str) -> None:
    create(custom, namespace, "weightversions", wv("v3"))
    patch = {"spec": {"source": {"path": "ckpts/v4"}}}
    with pytest.raises(client.ApiException) as e:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            "weightversions",
            "chat-v3",
            patch,
            _content_type="application/merge-patch+json",
        )
    assert e.value.status == 422
    assert "spec is immutable: create a new WeightVersion" in json.loads(e.value.body)["message"]
    # status stays writable (the operator's subresource)
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "weightversions",
        "chat-v3",
        {"status": {"phase": "Staging", "message": "ok"}},
        _content_type="application/merge-patch+json",
    )
    got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "weightversions", "chat-v3")
    assert got["status"]["phase"] == "Staging" and got["spec"]["source"]["path"] == "ckpts/v1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers"),
        ({"replicas": -1}, "spec.replicas in body should be greater than or equal to 0"),
        ({"model": {"path": "../base"}}, "model.path must not contain '..'"),
        ({"checkpointVolume": {"source": {}}}, "checkpointVolume.source must name exactly one volume source"),
        (
            {"checkpointVolume": {"source": {"hostPath": {"path": "/a"}, "emptyDir": {}}}},
            "checkpointVolume.source must name exactly one volume source",
        ),
        ({"engine": {"transport": {"p2pProtocol": "udp"}}}, 'Unsupported value: "udp"'),
        ({"updatePolicy": {"requests": "Drop"}}, 'Unsupported value: "Drop"'),
    ],
)
def test_invalid_pools_are_refused(
    custom: client.CustomObjectsApi, namespace: str, change: dict[str, Any], message: str
) -> None:
    status, body = refused(custom, namespace, "inferencepools", pool(**change))
    assert status == 422
    assert message in body


def test_long_pool_names_are_refused(custom: client.CustomObjectsApi, namespace: str) -> None:
    status, body = refused(custom, namespace, "inferencepools", pool(name="p" * 64))
    assert status == 422 and "at most 63 characters" in body


def test_scale_subresource_and_printer_columns(
    kube_api: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    create(custom, namespace, "inferencepools", pool())
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "inferencepools",
        "chat",
        {
            "status": {
                "replicas": 2,
                "readyReplicas": 1,
                "selector": "hotswap.dev/pool=chat",
                "currentVersion": "v1",
            }
        },
        _content_type="application/merge-patch+json",
    )
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, "inferencepools", "chat")
    assert scale["spec"]["replicas"] == 2
    assert scale["status"] == {"replicas": 2, "selector": "hotswap.dev/pool=chat"}
    custom.patch_namespaced_custom_object_scale(
        GROUP,
        VERSION,
        namespace,
        "inferencepools",
        "chat",
        {"spec": {"replicas": 3}},
        _content_type="application/merge-patch+json",
    )
    got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferencepools", "chat")
    assert got["spec"]["replicas"] == 3
    # `kubectl get hspool` columns, as the apiserver renders them
    method, url, headers, body, post = kube_api.param_serialize(
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/inferencepools",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
    )
    resp = kube_api.call_api(method, url, header_params=headers, body=body, post_params=post)
    resp.read()
    table = json.loads(resp.data)
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", "Desired", "Ready", "Updated", "Version", "Age"]
    assert table["rows"][0]["cells"][:5] == ["chat", 3, 1, 0, "v1"]  # updatedReplicas defaults to 0
