"""Install CustomResourceDefinitions from YAML files and wait until their resources are served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from .waiting import wait_for


def apply_crds(api: client.ApiClient, folder: Path, timeout: float = 30.0) -> list[str]:
    """Create or replace every CRD in `folder/*.yaml`, then wait until each is Established and its
    resources list (Established comes a moment before they are served). Returns the CRD names."""
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    bodies = [yaml.safe_load(path.read_text()) for path in sorted(folder.glob("*.yaml"))]
    for body in bodies:
        name = body["metadata"]["name"]
        try:
            current: Any = ext.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            ext.create_custom_resource_definition(body)
    for body in bodies:
        name, spec = body["metadata"]["name"], body["spec"]

        def established(name: str = name) -> bool:
            crd: Any = ext.read_custom_resource_definition(name)
            conds = crd.status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        def served(spec: Any = spec) -> bool:  # wait_for counts the 404 before that as "not yet"
            for version in spec["versions"]:
                custom.list_cluster_custom_object(spec["group"], version["name"], spec["names"]["plural"])
            return True

        wait_for(established, timeout, f"CRD {name} Established")
        wait_for(served, timeout, f"CRD {name} served")
    return [b["metadata"]["name"] for b in bodies]
