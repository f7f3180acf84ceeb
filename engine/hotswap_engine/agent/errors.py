"""Errors the agent's API turns into 4xx answers, each with the `ErrorBody.error` code it maps to.

Every error is classified: input that can never succeed as sent is a 4xx with its own code
(`BadRequest` for a malformed request or a path no file can have, `ForbiddenPath`, `NotFound`,
`CheckpointMismatch`, `Conflict`); anything else is a 500 `Internal`, which the operator treats as
transient and retries with exponential backoff. The codes are `hotswap_api.errors.ErrorCode`, the
one enum the operator classifies the answers by.
"""

from __future__ import annotations

from hotswap_api.errors import ErrorCode


class AgentError(Exception):
    status = 500
    code = ErrorCode.INTERNAL


class BadRequest(AgentError):
    status = 400
    code = ErrorCode.BAD_REQUEST


class NotFound(AgentError):
    status = 404
    code = ErrorCode.NOT_FOUND


class Conflict(AgentError):
    status = 409
    code = ErrorCode.CONFLICT


class ForbiddenPathError(AgentError):
    status = 403
    code = ErrorCode.FORBIDDEN_PATH


class CheckpointMismatchError(AgentError):
    status = 422
    code = ErrorCode.CHECKPOINT_MISMATCH
