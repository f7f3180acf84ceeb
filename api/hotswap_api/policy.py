"""What happens to in-flight requests while a pod swaps its weights: one enum for the CRD
(`InferencePool.spec.updatePolicy.requests`), the agent's update request and the launcher's /apply."""

from __future__ import annotations

from enum import StrEnum


class RequestPolicy(StrEnum):
    KEEP = "Keep"
    """Paused mid-generation and resumed on the new weights."""
    WAIT = "Wait"
    """New requests wait; in-flight ones finish on the old weights first."""
    ABORT = "Abort"
    """In-flight requests are aborted."""

    @property
    def vllm_mode(self) -> str:
        """vLLM's name for it (`pause_generation(mode=...)`)."""
        return self.value.lower()
