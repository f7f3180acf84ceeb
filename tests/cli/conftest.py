"""CLI tests against the local cluster: the CRDs from crds/ (created when missing, never replaced,
so a concurrent Helm-owned copy keeps its ownership marks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hotswap_cluster.waiting import wait_for
from kubernetes import client

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def cli_crds(kube_api: client.ApiClient) -> None:
    ext: Any = client.ApiextensionsV1Api(kube_api)
    custom: Any = client.CustomObjectsApi(kube_api)
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(body)
        except client.ApiException as e:
            if e.status != 409:
                raise
        plural = body["spec"]["names"]["plural"]
        wait_for(
            lambda p=plural: custom.list_cluster_custom_object("hotswap.dev", "v1alpha1", p) is not None,
            30,
            f"{plural} served",
        )
