"""Messages of the inference container's control socket: the agent asks the vLLM launcher to apply a
version (`POST /apply`). Validated here, one way, like the agent's own API (`protocol`).

The socket is private to the pod (a unix socket in a volume shared by the two containers), but the
launcher still refuses anything malformed before it pauses generation: a bad body changes nothing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

from hotswap_api.policy import RequestPolicy

DEFAULT_APPLY_TIMEOUT_S = 300.0
MAX_APPLY_TIMEOUT_S = 24 * 3600.0  # the workers turn it into ZeroMQ poll milliseconds
MAX_FIELD_CHARS = 1024
ENDPOINT_SCHEMES = ("ipc://", "tcp://")
# Non-empty, bounded, and no control characters (they would end up in log lines and file names).
_TEXT = r"^[^\x00-\x1f\x7f]+$"


class BadApplyRequest(ValueError):
    """A body /apply refuses with 400: nothing was paused or touched."""


class ApplyRequest(BaseModel):
    """The body of `POST /apply`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: StrictStr = Field(
        max_length=MAX_FIELD_CHARS, pattern=rf"^({'|'.join(ENDPOINT_SCHEMES)})[^\x00-\x1f\x7f]*$"
    )
    """The hand-off sender's ZeroMQ endpoint (ipc:// or tcp://) the vLLM workers read the version from."""
    version: StrictStr = Field(max_length=MAX_FIELD_CHARS, pattern=_TEXT)
    policy: RequestPolicy = RequestPolicy.KEEP
    """What happens to in-flight requests while the weights change."""
    timeout: float = Field(default=DEFAULT_APPLY_TIMEOUT_S, gt=0, le=MAX_APPLY_TIMEOUT_S, allow_inf_nan=False)
    """Seconds the pause, the hand-off and the workers' apply may take."""
    digests: StrictBool = False
    """Each worker fingerprints every tensor as it arrives and returns them as `received` in its result
    (the agent compares them with the version's manifest: `hotswap_engine.received_digests`)."""

    @field_validator("timeout", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> float:
        # Numbers only (no "1", no true); NaN, infinities and integers beyond float range are
        # refused here rather than failing inside the workers mid-apply.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number of seconds")
        try:
            return float(value)
        except OverflowError:
            raise ValueError("must be a number of seconds within float range") from None

    @classmethod
    def from_json(cls, raw: bytes) -> ApplyRequest:
        """The /apply body from its bytes. Raises `BadApplyRequest` and nothing else, whatever the
        bytes (invalid UTF-8 or JSON, NaN/Infinity, nesting deeper than the parser recurses)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            raise BadApplyRequest(_problems(e)) from None
        except (ValueError, RecursionError) as e:
            raise BadApplyRequest(f"not a JSON document: {e}") from None

    @classmethod
    def parse(cls, body: object) -> ApplyRequest:
        """A decoded JSON body (a dict). Raises `BadApplyRequest` (a ValueError) and nothing else."""
        if not isinstance(body, dict):
            raise BadApplyRequest("body must be a JSON object")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise BadApplyRequest(_problems(e)) from None


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"`{'.'.join(str(x) for x in err['loc']) or 'body'}`: {err['msg']}" for err in e.errors()[:5]
    )
