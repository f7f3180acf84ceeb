"""Fixtures for operator tests against the local cluster: the CRDs from crds/, applied once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hotswap_cluster.crds import apply_crds
from kubernetes import client

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def crds(kube_api: client.ApiClient) -> Iterator[None]:
    apply_crds(kube_api, CRDS)
    yield
