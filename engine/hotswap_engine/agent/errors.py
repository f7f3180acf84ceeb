"""Errors the agent's API turns into 4xx answers, each with the `ErrorBody.error` code it maps to.

Every error is classified: input that can never succeed as sent is a 4xx with its own code
(`bad_request` for a malformed request or a path no file can have, `forbidden_path`, `not_found`,
`checkpoint_mismatch`, `conflict`); anything else is a 500 `internal`, which the operator treats as
transient and retries with exponential backoff.
"""

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
