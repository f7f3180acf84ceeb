"""The error codes of hotswap's APIs: one enum for the agent's answers (`protocol.ErrorBody.error`),
the operator's classification of them, and whoever else reads them.

CamelCase values like a Kubernetes `Status.reason` (`NotFound`, `Conflict`, ...). The HTTP status is
the route's (`bad request` is a 400, a 413 or a 422 depending on what was wrong), so it is not here.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "BadRequest"
    """Malformed input: a body that does not validate, a path no file can have, a part that does not fit."""
    UNAUTHORIZED = "Unauthorized"
    """The bearer token is missing or wrong."""
    NOT_FOUND = "NotFound"
    """No such checkpoint, staged version, update or route."""
    CONFLICT = "Conflict"
    """The state forbids it now (another update is running, the version is served)."""
    CHECKPOINT_MISMATCH = "CheckpointMismatch"
    """The checkpoint's tensors differ from the model's (names, shapes, dtypes) or from its manifest."""
    FORBIDDEN_PATH = "ForbiddenPath"
    """The path lies outside the agent's allowed roots."""
    INTERNAL = "Internal"
    """Anything else: transient, retried with backoff."""

    @property
    def permanent(self) -> bool:
        """True when the same request can never succeed as sent (the operator does not retry it).
        `NotFound` depends on the route (a missing checkpoint is permanent, an unknown update id is
        not), so the caller decides it."""
        return self in _PERMANENT


_PERMANENT = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.CHECKPOINT_MISMATCH, ErrorCode.FORBIDDEN_PATH, ErrorCode.UNAUTHORIZED}
)
