"""Errors the agent's API turns into 4xx answers, each with the `ErrorBody.error` code it maps to."""

from __future__ import annotations


class AgentError(Exception):
    status = 500
    code = "internal"


class BadRequest(AgentError):
    status = 400
    code = "bad_request"


class NotFound(AgentError):
    status = 404
    code = "not_found"


class Conflict(AgentError):
    status = 409
    code = "conflict"


class ForbiddenPathError(AgentError):
    status = 403
    code = "forbidden_path"


class CheckpointMismatchError(AgentError):
    status = 422
    code = "checkpoint_mismatch"
