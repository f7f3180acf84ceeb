"""The agent's OpenAPI document: generated from the route table and `protocol`'s models, checked in
at docs/agent-openapi.json (fresh), and complete (every route, status and body documented)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hotswap_api import protocol
from hotswap_api.errors import ErrorCode
from hotswap_engine.agent import openapi

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent-openapi.json"


def test_checked_in_document_is_fresh() -> None:
    assert DOC.read_text() == openapi.render(), "docs/agent-openapi.json is stale: run `make openapi`"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    assert openapi.main(["--out", str(out)]) == 0
    assert openapi.main(["--check", str(out)]) == 0
    out.write_text(out.read_text().replace("bearer", "basic"))
    assert openapi.main(["--check", str(out)]) == 1
    assert openapi.main(["--check", str(tmp_path / "missing.json")]) == 1


def test_every_route_and_answer_is_documented() -> None:
    doc = openapi.generate()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for name in (
        "AgentStatus",
        "StageRequest",
        "StagedVersion",
        "UpdateRequest",
        "UpdateProgress",
        "ErrorBody",
    ):
        assert name in schemas, name
    assert doc["components"]["securitySchemes"][openapi.SECURITY_SCHEME] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The pool's agent token (the operator keeps it in a Secret).",
    }
    assert doc["security"] == [{openapi.SECURITY_SCHEME: []}]
    for r in openapi.ROUTES:
        op = doc["paths"][r.path][r.method]
        assert op["operationId"] == r.operation_id
        assert ("security" in op) is (not r.auth), r.path
        codes = set(op["responses"])
        if r.auth:
            assert {"401", "500"} <= codes, r.path
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
        if r.body is not None:
            assert op["requestBody"]["required"] is True
            assert "422" in codes, f"{r.path}: a body route documents its validation error"
        for status, answer in op["responses"].items():
            assert answer["description"], (r.path, status)
            if int(status) >= 400 and r.auth:
                assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"/healthz", "/readyz", "/metrics", "/openapi.json"} == openapi.OPEN_PATHS


def test_refs_resolve_and_models_forbid_unknown_fields() -> None:
    doc = openapi.generate()
    schemas = doc["components"]["schemas"]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    for name, schema in schemas.items():
        if schema.get("type") == "object":
            assert schema.get("additionalProperties") is False, f"{name} takes unknown fields"


def test_error_codes_in_the_document_are_the_models() -> None:
    schemas = openapi.generate()["components"]["schemas"]
    ref = schemas["ErrorBody"]["properties"]["error"]["$ref"]
    assert schemas[ref.rsplit("/", 1)[-1]]["enum"] == [c.value for c in ErrorCode]


def test_a_reply_is_a_model_or_a_media_type() -> None:
    with pytest.raises(ValueError, match="not both"):
        openapi.Reply("x", protocol.ErrorBody, media="text/plain")
