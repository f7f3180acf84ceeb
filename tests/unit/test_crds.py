"""The CRDs in crds/: fresh (regenerated from the models) and structural (rules checkable offline).

What only a real apiserver can judge (CEL compilation and cost, the rejection messages) is checked
in tests/operator/test_crd_validation.py against the local cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hotswap_api.resources import InferencePool, WeightVersion
from hotswap_operator import crdgen

CRDS = Path(__file__).resolve().parents[2] / "crds"

# The keys of apiextensions/v1 JSONSchemaProps this generator may use.
ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "nullable",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CRDS / name).read_text())
    return doc


def test_checked_in_crds_are_fresh() -> None:
    generated = crdgen.generate()
    on_disk = {p.name for p in CRDS.glob("*.yaml")}
    assert set(generated) <= on_disk, f"missing in crds/: {set(generated) - on_disk}; run `make crds`"
    for name, text in generated.items():
        assert (CRDS / name).read_text() == text, f"crds/{name} is stale: run `make crds`"


def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 0
    victim = tmp_path / crdgen.file_name(WeightVersion)
    victim.write_text(victim.read_text().replace("Superseded", "Gone"))
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path or ".", node)]
    for name, sub in (node.get("properties") or {}).items():
        out += walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def schema_of(doc: dict[str, Any]) -> dict[str, Any]:
    (version,) = doc["spec"]["versions"]
    s: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return s


def at(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def type_ok(node: dict[str, Any], value: Any) -> bool:
    t = node.get("type")
    if value is None:
        return bool(node.get("nullable"))
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }.get(str(t), node.get("x-kubernetes-preserve-unknown-fields", False))


FILES = [crdgen.file_name(InferencePool), crdgen.file_name(WeightVersion)]


@pytest.mark.parametrize("name", FILES)
def test_schema_is_structural(name: str) -> None:
    schema = schema_of(load(name))
    assert schema["type"] == "object"
    assert schema["properties"]["metadata"] == {"type": "object"}, "metadata may only be typed"
    for path, node in walk(schema):
        unknown = set(node) - ALLOWED_KEYS
        assert not unknown, f"{path}: keys the apiserver does not know: {unknown}"
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") in TYPES, f"{path}: every node needs a type"
        elif "type" in node:
            assert node["type"] == "object", f"{path}: preserve-unknown-fields is for objects"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("additionalProperties"), bool), f"{path}: boolean additionalProperties"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, False), bool), f"{path}: {key} must be a boolean in OpenAPI v3.0"
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: arrays need items"
        for req in node.get("required", []):
            assert req in node.get("properties", {}), f"{path}: required {req} is not a property"
        if "pattern" in node:
            re.compile(node["pattern"])
        if "default" in node:
            d = node["default"]
            assert type_ok(node, d), f"{path}: default {d!r} does not have type {node.get('type')}"
            if "enum" in node:
                assert d in node["enum"], f"{path}: default {d!r} not in enum"
            if "pattern" in node:
                assert re.search(node["pattern"], d), f"{path}: default {d!r} does not match pattern"
        if "enum" in node:
            assert all(type_ok(node, v) for v in node["enum"]), path
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key], (
                    f"{path}: list-map key {key} must be required or defaulted"
                )
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) <= {"rule", "message", "messageExpression", "reason", "fieldPath"}, path
            assert rule["rule"] and (rule.get("message") or rule.get("messageExpression")), (
                f"{path}: every CEL rule says what is wrong"
            )
        # CEL string functions cost in proportion to the longest possible string: bound them.
        if node.get("type") == "string" and any(
            "matches" in r["rule"] for r in node.get("x-kubernetes-validations", [])
        ):
            assert "maxLength" in node, f"{path}: a regex rule on an unbounded string"
    assert not [p for p, n in walk(schema) if "$ref" in n or "anyOf" in n or "allOf" in n or "oneOf" in n]


@pytest.mark.parametrize("name", FILES)
def test_names_subresources_and_columns(name: str) -> None:
    doc = load(name)
    spec = doc["spec"]
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1" and doc["kind"] == "CustomResourceDefinition"
    assert spec["group"] == "hotswap.dev" and spec["scope"] == "Namespaced"
    assert doc["metadata"]["name"] == f"{spec['names']['plural']}.hotswap.dev"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    schema = version["schema"]["openAPIV3Schema"]
    for col in version["additionalPrinterColumns"]:
        if col["jsonPath"].startswith(".metadata."):
            continue
        node = at(schema, col["jsonPath"])
        assert node["type"] == col["type"], (
            f"column {col['name']} says {col['type']}, field is {node['type']}"
        )
    assert "status" not in schema.get("required", [])


def test_inference_pool_names_scale_and_columns() -> None:
    doc = load(crdgen.file_name(InferencePool))
    names = doc["spec"]["names"]
    assert names["kind"] == "InferencePool" and names["shortNames"] == ["hspool"]
    assert names["categories"] == ["hotswap"]
    (version,) = doc["spec"]["versions"]
    scale = version["subresources"]["scale"]
    schema = version["schema"]["openAPIV3Schema"]
    assert at(schema, scale["specReplicasPath"])["type"] == "integer"
    assert at(schema, scale["statusReplicasPath"])["type"] == "integer"
    assert at(schema, scale["labelSelectorPath"])["type"] == "string"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Desired",
        "Ready",
        "Updated",
        "Version",
        "Age",
    ]
    conds = at(schema, ".status.conditions")
    assert conds["x-kubernetes-list-type"] == "map" and conds["x-kubernetes-list-map-keys"] == ["type"]
    template = at(schema, ".spec.template")
    assert template["x-kubernetes-preserve-unknown-fields"] is True
    assert at(schema, ".spec.template.spec")["required"] == ["containers"]
    assert "inference.networking.k8s.io" not in yaml.safe_dump(doc)
    assert "inferencepools.hotswap.dev" in schema["description"]


def test_weight_version_rules() -> None:
    doc = load(crdgen.file_name(WeightVersion))
    (version,) = doc["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert doc["spec"]["names"]["shortNames"] == ["wv"]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Pool",
        "Version",
        "Phase",
        "Updated",
        "Age",
    ]
    spec = at(schema, ".spec")
    assert spec["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert "immutable" in spec["x-kubernetes-validations"][0]["message"]
    assert set(spec["required"]) == {"poolRef", "version", "source"}
    assert at(schema, ".spec.strategy")["enum"] == ["Broadcast", "P2P"]
    rules = [r["rule"] for r in at(schema, ".spec.source.path")["x-kubernetes-validations"]]
    assert rules == ["!self.startsWith('/')", "!self.matches('(^|/)[.][.](/|$)')"]
    (name_rule,) = schema["x-kubernetes-validations"]
    assert name_rule["rule"] == "self.metadata.name == self.spec.poolRef.name + '-' + self.spec.version"
    assert at(schema, ".status.phase")["enum"] == [
        "Pending",
        "Staging",
        "Updating",
        "Complete",
        "Failed",
        "Superseded",
    ]


# The path rule is CEL on the apiserver; the same regex (RE2 and Python agree on it) decides here.
ESCAPE = re.compile(r"(^|/)[.][.](/|$)")


@pytest.mark.parametrize(
    ("path", "escapes"),
    [
        ("ckpts/v1", False),
        ("ckpts/v1/model.safetensors", False),
        ("a..b/c", False),
        ("..hidden/x", False),
        ("..", True),
        ("../x", True),
        ("ckpts/../../etc", True),
        ("ckpts/..", True),
    ],
)
def test_path_escape_regex(path: str, escapes: bool) -> None:
    assert bool(ESCAPE.search(path)) is escapes


def test_conversion_of_json_schema_constructs() -> None:
    defs = {"E": {"enum": ["a", "b"], "title": "E", "type": "string"}}
    node = {
        "type": "object",
        "title": "X",
        "properties": {
            "c": {"const": "fixed"},
            "n": {"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "null"}], "default": None},
            "e": {"allOf": [{"$ref": "#/$defs/E"}], "description": "one of\n   two"},
            "m": {"type": "object", "additionalProperties": {"type": "integer"}},
            "free": {"type": "object", "additionalProperties": True},
            "closed": {
                "type": "object",
                "properties": {"x": {"type": "string"}},
                "additionalProperties": False,
            },
        },
    }
    out = crdgen.to_structural(node, defs)
    p = out["properties"]
    assert "title" not in out
    assert p["c"] == {"type": "string", "enum": ["fixed"]}
    assert p["n"] == {"type": "integer", "exclusiveMinimum": True, "minimum": 0, "nullable": True}
    assert p["e"] == {"description": "one of two", "type": "string", "enum": ["a", "b"]}
    assert p["m"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert p["free"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert p["closed"] == {"type": "object", "properties": {"x": {"type": "string"}}}


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "a union of 2 types"),
        ({"$ref": "#/$defs/Nope"}, "unresolvable"),
        ({"description": "no type"}, "without a type"),
    ],
)
def test_constructs_without_a_structural_form_are_refused(node: dict[str, Any], message: str) -> None:
    with pytest.raises(crdgen.SchemaError, match=message):
        crdgen.to_structural(node, {})
