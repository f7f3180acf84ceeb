"""Fixtures for operator tests against the local cluster: the CRDs from crds/, applied once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def crds(kube_api: client.ApiClient) -> Iterator[None]:
    ext = client.ApiextensionsV1Api(kube_api)
    names = []
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        try:
            current = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            ext.create_custom_resource_definition(body)
    deadline = time.monotonic() + 30
    for name in names:
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established: {conds}"
            time.sleep(0.2)
    # Established comes a moment before the resources are served: wait until they list.
    custom = client.CustomObjectsApi(kube_api)
    for path in sorted(CRDS.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())["spec"]
        while True:
            try:
                custom.list_cluster_custom_object(spec["group"], "v1alpha1", spec["names"]["plural"])
                break
            except client.ApiException as e:
                assert e.status == 404 and time.monotonic() < deadline, f"{path.name} not served: {e}"
                time.sleep(0.2)
    yield
