"""The agent's HTTP API as data: the route table `api.build_app` serves, and the OpenAPI 3.1 document
generated from it and from `protocol`'s models.

Pure (no torch, no aiohttp, no I/O), so the document is a function of the code: the agent serves it
at `GET /openapi.json`, `docs/agent-openapi.json` is the checked-in copy (`make openapi` rewrites it;
tests/unit/test_openapi.py fails when it is stale), and tests/engine/test_agent_fuzz.py fuzzes a real
agent against it with schemathesis.

    python -m hotswap_engine.agent.openapi [--out FILE | --check FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hotswap_api import protocol
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

OPENAPI_PATH = "/openapi.json"
TITLE = "hotswap agent"
DOC_VERSION = "1.0.0"  # of the wire API under protocol.API_PREFIX; bump on an incompatible change
SECURITY_SCHEME = "bearerToken"
REF_TEMPLATE = "#/components/schemas/{model}"

Method = Literal["get", "post", "delete"]


@dataclass(frozen=True)
class Reply:
    """One documented answer: a JSON body of `model`, a text body (`media`), or none."""

    description: str
    model: type[BaseModel] | None = None
    media: str | None = None  # a non-JSON body ("text/plain")

    def __post_init__(self) -> None:
        if self.model is not None and self.media is not None:
            raise ValueError("a reply has a model or a media type, not both")


@dataclass(frozen=True)
class PathParam:
    name: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string", "minLength": 1})
    location: Literal["path", "query"] = "path"

    @property
    def required(self) -> bool:
        return self.location == "path"


def query_params(model: type[BaseModel], descriptions: Mapping[str, str]) -> tuple[PathParam, ...]:
    """Optional query parameters, one per field of `model` (the model the handler validates the
    query with, so the document and the validation cannot disagree)."""
    props = model.model_json_schema(mode="validation")["properties"]
    out = []
    for name, schema in props.items():
        one = {k: v for k, v in schema.items() if k not in ("title", "default", "anyOf")}
        # `int | None` is an optional parameter of the int's schema, not a nullable one
        branches = [b for b in schema.get("anyOf", ()) if b.get("type") != "null"]
        if branches:
            one.update(branches[0])
        out.append(PathParam(name, descriptions[name], one, "query"))
    return tuple(out)


@dataclass(frozen=True)
class Route:
    method: Method
    path: str
    operation_id: str  # also the name of the handler in `api`
    summary: str
    replies: Mapping[int, Reply]
    body: type[BaseModel] | None = None  # the JSON request body, validated with this model
    auth: bool = True  # needs `Authorization: Bearer <token>`
    params: tuple[PathParam, ...] = ()


def _error(description: str) -> Reply:
    return Reply(description, protocol.ErrorBody)


# Every route that needs the token may answer these.
UNAUTHORIZED = _error("`Unauthorized`: the bearer token is missing or wrong.")
INTERNAL = _error(
    "`Internal`: an unexpected failure on the agent's side (the operator treats it as transient and "
    "retries with backoff). Never the answer to a malformed request."
)
INVALID = _error(
    "`BadRequest`: the body is not valid JSON, or does not match the model (unknown fields, "
    "wrong types, values out of range); the message names the fields."
)

_P = protocol.API_PREFIX
_VERSION_SCHEMA: Mapping[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 63,
    "pattern": r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$",
}

ROUTES: tuple[Route, ...] = (
    Route(
        "get",
        f"{_P}/status",
        "status",
        "What this pod serves, what it has staged, and its latest update; a long-poll with "
        "`wait_for_change_after`.",
        {
            200: Reply("The agent's status.", protocol.AgentStatus),
            400: _error("`BadRequest`: a query parameter given more than once."),
            401: UNAUTHORIZED,
            422: _error("`BadRequest`: a query parameter out of range or of the wrong type."),
            500: INTERNAL,
        },
        params=query_params(
            protocol.StatusWait,
            {
                "wait_for_change_after": (
                    "A `sequence` from an earlier status: answer as soon as the agent's sequence "
                    "differs from it (its state changed, or the agent restarted), else after "
                    "`timeout_seconds`. Absent: answer at once."
                ),
                "timeout_seconds": (
                    "The longest to wait for a change (the agent may cap it lower); only with "
                    "`wait_for_change_after`."
                ),
            },
        ),
    ),
    Route(
        "post",
        f"{_P}/stage",
        "stage",
        "Read (a part of) a checkpoint into host memory after validating it against the served model.",
        {
            201: Reply("Staged (or staged already: the call is idempotent).", protocol.StagedVersion),
            400: _error("`BadRequest`: a path no file can have."),
            401: UNAUTHORIZED,
            403: _error("`ForbiddenPath`: the path lies outside the agent's allowed roots."),
            404: _error("`NotFound`: no checkpoint at that path."),
            409: _error("`Conflict`: the version is served or being applied from another checkpoint."),
            413: _error("`BadRequest`: the body is larger than 1 MiB."),
            422: _error(
                "`BadRequest` for a body that does not match the model; `CheckpointMismatch` for a "
                "checkpoint whose tensors, headers or manifest do not match."
            ),
            500: INTERNAL,
        },
        body=protocol.StageRequest,
    ),
    Route(
        "delete",
        f"{_P}/staged/{{version}}",
        "drop_staged",
        "Free a staged version's host memory.",
        {
            204: Reply("Dropped."),
            401: UNAUTHORIZED,
            404: _error("`NotFound`: the version is not staged here."),
            409: _error("`Conflict`: the version is served (it is the rollback source) or being applied."),
            500: INTERNAL,
        },
        params=(PathParam("version", "A staged version's name.", _VERSION_SCHEMA),),
    ),
    Route(
        "post",
        f"{_P}/updates",
        "start_update",
        "Start an update to a version (broadcast with a group, or peer-to-peer); poll it by id.",
        {
            202: Reply("Started; the update runs in the background.", protocol.UpdateProgress),
            400: _error("`BadRequest`: the group or staged part does not fit this pod."),
            401: UNAUTHORIZED,
            404: _error("`NotFound`: a broadcast of a version that is not staged here."),
            409: _error("`Conflict`: another update is still running."),
            413: _error("`BadRequest`: the body is larger than 1 MiB."),
            422: INVALID,
            500: INTERNAL,
        },
        body=protocol.UpdateRequest,
    ),
    Route(
        "get",
        f"{_P}/updates/{{id}}",
        "get_update",
        "An update's progress.",
        {
            200: Reply("The update.", protocol.UpdateProgress),
            401: UNAUTHORIZED,
            404: _error("`NotFound`: no update with that id."),
            500: INTERNAL,
        },
        params=(PathParam("id", "The id `POST /updates` answered."),),
    ),
    Route(
        "get",
        "/healthz",
        "healthz",
        "Liveness: the agent's event loop answers.",
        {200: Reply("Alive.", media="text/plain")},
        auth=False,
    ),
    Route(
        "get",
        "/readyz",
        "readyz",
        "Readiness: serving a fully applied version, no update or rollback running.",
        {
            200: Reply("Ready.", media="text/plain"),
            503: Reply("Not ready; the body says why.", media="text/plain"),
        },
        auth=False,
    ),
    Route(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics.",
        {200: Reply("Prometheus text exposition format.", media="text/plain")},
        auth=False,
    ),
    Route(
        "get",
        OPENAPI_PATH,
        "openapi",
        "This document.",
        {200: Reply("The OpenAPI 3.1 document of this API.", media="application/json")},
        auth=False,
    ),
)

OPEN_PATHS = frozenset(r.path for r in ROUTES if not r.auth)


def _models(routes: Sequence[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Request models in validation mode, reply models in serialization mode (each once)."""
    out: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for r in routes:
        wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = []
        if r.body is not None:
            wanted.append((r.body, "validation"))
        wanted += [(rep.model, "serialization") for rep in r.replies.values() if rep.model is not None]
        out += [w for w in wanted if w not in out]
    return out


def _content(schema: Mapping[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {media: {"schema": dict(schema)}}


def generate(routes: Sequence[Route] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` (deterministic: the same code gives the same bytes)."""
    keys, defs = models_json_schema(_models(routes), ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary}
        if not r.auth:
            op["security"] = []
        if r.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required,
                    "description": p.description,
                    "schema": p.schema,
                }
                for p in r.params
            ]
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": _content(keys[(r.body, "validation")])}
        responses: dict[str, Any] = {}
        for status, rep in sorted(r.replies.items()):
            answer: dict[str, Any] = {"description": rep.description}
            if rep.model is not None:
                answer["content"] = _content(keys[(rep.model, "serialization")])
            elif rep.media == "application/json":
                answer["content"] = _content({"type": "object"})
            elif rep.media is not None:
                answer["content"] = _content({"type": "string"}, rep.media)
            responses[str(status)] = answer
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": DOC_VERSION,
            "description": (
                "The in-pod agent of hotswap (one per inference pod): stages checkpoints and runs "
                "weight updates. Generated from hotswap_api.protocol and the route table in "
                "hotswap_engine.agent.openapi; do not edit by hand (`make openapi`)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The pool's agent token (the operator keeps it in a Secret).",
                }
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def render(doc: Mapping[str, Any] | None = None) -> str:
    """The document as the checked-in file holds it."""
    return json.dumps(generate() if doc is None else doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotswap_engine.agent.openapi", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, help="write the document to this file (default: stdout)")
    g.add_argument("--check", type=Path, help="exit 1 when this file differs from the generated document")
    a = p.parse_args(argv)
    text = render()
    if a.check is not None:
        if not a.check.exists() or a.check.read_text() != text:
            print(f"{a.check} is stale: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    if a.out is not None:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
