"""The Helm chart, offline: `helm lint`, and what `helm template` renders.

Against the real helm binary the cluster scripts build (cluster/versions.env pins its version). The
install/upgrade/uninstall round trip against the local cluster is in test_chart_install.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmtool import CHART, REPO, by_kind, helm, load_yaml, one, render, set_args
from hotswap_operator.settings import ENV_PREFIX, OperatorSettings, load
from pydantic import ValidationError
from pydantic_settings import SettingsError

Obj = dict[str, Any]

# The operator's permissions per managed namespace: exactly these (see templates/_helpers.tpl for why).
NAMESPACED_RULES = [
    {
        "apiGroups": ["hotswap.dev"],
        "resources": ["inferencepools"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {
        "apiGroups": ["hotswap.dev"],
        "resources": ["weightversions"],
        "verbs": ["get", "list", "watch", "delete"],
    },
    {
        "apiGroups": ["hotswap.dev"],
        "resources": ["inferencepools/status", "weightversions/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": ["hotswap.dev"], "resources": ["inferencepools/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["hs-hotswap"],
        "verbs": ["get", "update"],
    }
]
CRD_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
SA = [{"kind": "ServiceAccount", "name": "hs-hotswap", "namespace": "hotswap-system"}]


def test_helm_lint() -> None:
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout
    helm("lint", "--strict", str(CHART), *set_args({"watchNamespaces": '["a","b"]', "logLevel": "debug"}))


def test_crd_copies_match_the_generated_crds() -> None:
    generated = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert set(copies) == set(generated), "run `make chart-crds`"
    for name, text in generated.items():
        assert copies[name] == text, (
            f"charts/hotswap/files/crds/{name} differs from crds/{name}: run `make chart-crds`"
        )


def test_rendered_crds_are_the_generated_ones_plus_labels_and_keep() -> None:
    crds = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    assert set(crds) == {"inferencepools.hotswap.dev", "weightversions.hotswap.dev"}
    for path in (REPO / "crds").glob("*.yaml"):
        source = load_yaml(path)
        rendered = crds[source["metadata"]["name"]]
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert set(source["metadata"]["labels"].items()) <= set(rendered["metadata"]["labels"].items())
        assert rendered["spec"] == source["spec"], f"{path.name}: the template changed the CRD's spec"
    no_keep = by_kind(render(*set_args({"crds.keep": "false"})), "CustomResourceDefinition")
    assert len(no_keep) == 2 and all("annotations" not in d["metadata"] for d in no_keep)
    assert by_kind(render(*set_args({"crds.install": "false"})), "CustomResourceDefinition") == []


def deployment(docs: list[Obj]) -> Obj:
    return one(docs, "Deployment", "hs-hotswap")


def test_deployment_security_and_probes() -> None:
    d = deployment(render())
    pod = d["spec"]["template"]["spec"]
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["serviceAccountName"] == "hs-hotswap"
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert c["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert c["resources"]["limits"]["memory"] == "512Mi"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert c["image"] == "ghcr.io/hotswap-dev/hotswap-operator:0.1.0"
    # runAsUser: null leaves the uid to the platform; runAsNonRoot stays
    pod = deployment(render("--set", "runAsUser=null"))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def container_args(docs: list[Obj]) -> list[str]:
    args: list[str] = deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


# What the kubelet expands the $(VAR)s of the operator container with (the downward API).
DOWNWARD = {"POD_NAME": "hs-hotswap-abc", "POD_NAMESPACE": "hotswap-system", "POD_IP": "10.1.2.3"}


def expand(text: str) -> str:
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: DOWNWARD[m.group(1)], text)


def operator_settings(docs: list[Obj], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """The rendered operator container's flags and environment, read by the operator's settings
    class (an unknown flag or an invalid value fails here as it would at start-up)."""
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]  # whatever its name
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for var in c["env"]:
        if var["name"].startswith(ENV_PREFIX):
            monkeypatch.setenv(var["name"], expand(var["value"]))
    return load([expand(a) for a in c["args"]])


def chart_values(field: str) -> list[str]:
    """The chart values a setting declares (`chart` in its Field's extra)."""
    extra = OperatorSettings.model_fields[field].json_schema_extra
    return list(extra["chart"]) if isinstance(extra, dict) else []  # type: ignore[arg-type]


def leaves(values: Obj, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        out |= leaves(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return out


# Chart values that shape Kubernetes objects (the Deployment, RBAC, CRDs), not the operator's settings;
# a value under one of these prefixes needs no setting.
NOT_SETTINGS = (
    "image",
    "imagePullSecrets",
    "replicaCount",
    "command",
    "extraArgs",  # passed through: see test_extra_args_and_env_reach_the_settings
    "extraEnv",
    "liveness.startupSeconds",
    "metrics.service",
    "crds",
    "rbac",
    "serviceAccount",
    "resources",
    "runAsUser",
    "podAnnotations",
    "podLabels",
    "priorityClassName",
    "nodeSelector",
    "tolerations",
    "affinity",
)

# Every value that maps onto a setting, set to something other than its default ...
EVERY_VALUE = {
    "watchNamespaces": '["team-a","team-b"]',
    "fullnameOverride": "op",
    "leaderElection.leaseDurationSeconds": "30",
    "listenAddress": "$(POD_IP)",
    "liveness.port": "8081",
    "metrics.enabled": "true",
    "metrics.port": "9191",
    "logLevel": "debug",
    "operator.p2pCatchUp": "false",
    "operator.agentTimeoutSeconds": "9",
    "operator.stageTimeoutSeconds": "60",
    "engine.gpuSharing.mode": "dra",
}
# ... and the settings the operator then runs with; then the cases EVERY_VALUE cannot show at once.
CASES: list[tuple[dict[str, str], dict[str, object]]] = [
    (
        EVERY_VALUE,
        {
            "namespace": ["team-a", "team-b"],
            "lease_name": "op",
            "lease_duration": 30,
            "liveness": "http://10.1.2.3:8081/healthz",
            "metrics": "10.1.2.3:9191",
            "verbose": True,
            "p2p_catch_up": False,
            "agent_timeout": 9.0,
            "stage_timeout": 60.0,
            "gpu_sharing": "dra",
        },
    ),
    ({"metrics.enabled": "false", "nameOverride": "x"}, {"metrics": None, "lease_name": "hs-x"}),
]


def test_every_chart_value_reaches_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chart value is either a Kubernetes-object value or declared by a setting, each declared
    value is exercised, and rendering with it gives the operator that setting."""
    declared = {v: f for f in OperatorSettings.model_fields for v in chart_values(f)}
    values = leaves(load_yaml(CHART / "values.yaml"))
    unmapped = {v for v in values if not any(v == p or v.startswith(f"{p}.") for p in NOT_SETTINGS)}
    assert unmapped == set(declared), "a chart value nothing reads, or a setting naming no chart value"
    for field in {declared[v] for v in declared}:
        exercised = set().union(*(set(given) for given, expect in CASES if field in expect))
        assert set(chart_values(field)) <= exercised, f"{field}: a chart value no case sets"
    for given, expect in CASES:
        settings = operator_settings(render(*set_args(given)), monkeypatch)
        assert {f: getattr(settings, f) for f in expect} == expect, given


def test_chart_defaults_are_the_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the chart's defaults the operator runs with its own defaults, except where the chart has a
    reason (its names, its probes, the pod's identity)."""
    settings = operator_settings(render(), monkeypatch)
    chart_specific = {
        "lease_name": "hs-hotswap",
        "lease_namespace": "hotswap-system",
        "identity": "hs-hotswap-abc",
        "liveness": "http://0.0.0.0:8080/healthz",
        "metrics": "0.0.0.0:9090",
    }
    for field, info in OperatorSettings.model_fields.items():
        default = chart_specific.get(field, info.get_default(call_default_factory=True))
        assert getattr(settings, field) == default, field


def test_extra_args_and_env_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings without a chart value of their own go through extraArgs or extraEnv."""
    docs = render(
        *set_args(
            {
                "command": '["/venv/bin/python","-m","hotswap_operator"]',
                "extraArgs": '["--idle-requeue=7"]',
                "extraEnv": json.dumps(
                    [{"name": f"{ENV_PREFIX}RETRY_BACKOFF", "value": "3"}, {"name": "X", "value": "1"}]
                ),
            }
        )
    )
    c = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["/venv/bin/python", "-m", "hotswap_operator"]
    assert {e["name"]: e.get("value") for e in c["env"]}["X"] == "1"
    settings = operator_settings(docs, monkeypatch)
    assert (settings.idle_requeue, settings.retry_backoff) == (7.0, 3.0)


def test_invalid_settings_fail_like_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="unrecognized arguments: --nonsense"):
        operator_settings(render(*set_args({"extraArgs": '["--nonsense=1"]'})), monkeypatch)
    with pytest.raises(ValidationError, match="agent_timeout"):
        operator_settings(render(*set_args({"extraArgs": '["--agent-timeout=-1"]'})), monkeypatch)


def rbac(docs: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    kinds = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    return {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in kinds
    }


def test_rbac_all_namespaces() -> None:
    objs = rbac(render())
    assert set(objs) == {
        ("ClusterRole", "", "hs-hotswap"),
        ("ClusterRoleBinding", "", "hs-hotswap"),
        ("ClusterRole", "", "hs-hotswap-observe"),
        ("ClusterRoleBinding", "", "hs-hotswap-observe"),
        ("Role", "hotswap-system", "hs-hotswap-leader-election"),
        ("RoleBinding", "hotswap-system", "hs-hotswap-leader-election"),
    }
    assert objs["ClusterRole", "", "hs-hotswap"]["rules"] == NAMESPACED_RULES
    # all namespaces: kopf does not list namespaces, so only CRDs
    assert objs["ClusterRole", "", "hs-hotswap-observe"]["rules"] == [CRD_RULE]
    assert objs["Role", "hotswap-system", "hs-hotswap-leader-election"]["rules"] == LEASE_RULES
    for key, obj in objs.items():
        if key[0].endswith("Binding"):
            assert obj["subjects"] == SA
            assert obj["roleRef"]["name"] == key[2] and obj["roleRef"]["kind"] == key[0].removesuffix(
                "Binding"
            )
    lease = one(render(), "Lease", "hs-hotswap")
    assert lease["metadata"]["namespace"] == "hotswap-system" and lease["spec"] == {}


def test_rbac_selected_namespaces_has_no_cluster_wide_access() -> None:
    docs = render(*set_args({"watchNamespaces": '["team-a","team-b"]'}))
    objs = rbac(docs)
    assert set(objs) == {
        ("Role", "team-a", "hs-hotswap"),
        ("RoleBinding", "team-a", "hs-hotswap"),
        ("Role", "team-b", "hs-hotswap"),
        ("RoleBinding", "team-b", "hs-hotswap"),
        ("Role", "hotswap-system", "hs-hotswap-leader-election"),
        ("RoleBinding", "hotswap-system", "hs-hotswap-leader-election"),
        ("ClusterRole", "", "hs-hotswap-observe"),
        ("ClusterRoleBinding", "", "hs-hotswap-observe"),
    }
    for ns in ("team-a", "team-b"):
        assert objs["Role", ns, "hs-hotswap"]["rules"] == NAMESPACED_RULES
        assert objs["RoleBinding", ns, "hs-hotswap"]["subjects"] == SA
    # cluster-wide only reads of CRDs and namespace names (kopf's observers)
    assert objs["ClusterRole", "", "hs-hotswap-observe"]["rules"] == [CRD_RULE, NAMESPACES_RULE]
    assert "--namespace=team-a" in container_args(docs) and "--namespace=team-b" in container_args(docs)
    no_crds = rbac(render(*set_args({"watchNamespaces": '["team-a"]', "rbac.watchCRDs": "false"})))
    assert no_crds["ClusterRole", "", "hs-hotswap-observe"]["rules"] == [NAMESPACES_RULE]
    assert ("ClusterRole", "", "hs-hotswap-observe") not in rbac(
        render(*set_args({"rbac.watchCRDs": "false"}))
    )
    assert rbac(render(*set_args({"rbac.create": "false"}))) == {}


def test_no_rule_grants_wildcards_or_escalation() -> None:
    for obj in rbac(render()).values():
        for rule in obj.get("rules", []):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
            if "delete" in rule["verbs"]:  # only finished WeightVersions beyond a pool's history limit
                assert (rule["apiGroups"], rule["resources"]) == (["hotswap.dev"], ["weightversions"])


def test_every_object_is_labelled_and_namespaced_objects_are_in_the_release_namespace() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for d in render():
        meta = d["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "hs", d["kind"]
        if d["kind"] in cluster_scoped:
            assert "namespace" not in meta
        elif d["kind"] not in ("Role", "RoleBinding"):
            assert meta["namespace"] == "hotswap-system", d["kind"]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"logLevel": "trace"}, "logLevel"),
        ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
        ({"watchNamespaces": '["Team_A"]'}, "watchNamespaces"),
        ({"metrics.port": "70000"}, "port"),
        ({"engine.gpuSharing.mode": "mps"}, "mode"),
        ({"crds.install": '"yes"'}, "install"),
        ({"replicaCount": "-1"}, "replicaCount"),
        ({"resources.requests.memory": "lots"}, "memory"),
        ({"surprise": "1"}, "surprise"),
        ({"rbac.clusterAdmin": "true"}, "clusterAdmin"),
        ({"command": "[]"}, "command"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, str], needle: str) -> None:
    out = helm("template", "hs", str(CHART), *set_args(values), check=False)
    assert out.returncode != 0, f"accepted {values}"
    assert "schema" in out.stderr and needle in out.stderr, out.stderr


def test_values_file_defaults_pass_the_schema_and_every_key_is_described(tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])
    assert schema["additionalProperties"] is False
    # A chart copy whose values.yaml sets an unknown key fails even without --set.
    copy = tmp_path / "hotswap"
    shutil.copytree(CHART, copy)
    (copy / "values.yaml").write_text((CHART / "values.yaml").read_text() + "\nlogLevl: debug\n")
    out = helm("template", "hs", str(copy), check=False)
    assert out.returncode != 0 and "logLevl" in out.stderr
