"""Each pod's agent status, kept current by one long-poll per pod instead of a poll per reconcile.

A `AgentWatch` asks its agent `GET /v1/status?wait_for_change_after=<sequence>` in a loop: the
agent answers as soon as its state changes (a version staged, an update moving to its next stage or
finishing, the engine coming up), else after `LONG_POLL_S` (the same status; asked again). Each
answer that differs from the last wakes the pool's reconcile, so the operator learns that staging
or an update finished when it finishes. Per pod there is one open request at a time, whatever the
rollout does: 500 pods cost 500 idle connections and 500/`LONG_POLL_S` requests a second, no storm.

An agent that cannot be reached reads as `None` (as a failed poll did) and is asked again after a
backoff that doubles up to `RETRY_MAX_S`: a pod that went away is not hammered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from hotswap_api import protocol

from hotswap_operator.agents import AgentClient, AgentClientError

log = logging.getLogger(__name__)

LONG_POLL_S = 30.0  # how long an agent holds one status request open when nothing changes
RETRY_MIN_S = 0.5  # first retry after a failed request; doubles up to RETRY_MAX_S
RETRY_MAX_S = 10.0


def retry_after(failures: int) -> float:
    """Seconds before asking an agent again after `failures` failed requests in a row (pure)."""
    return float(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** max(0, failures - 1)))


def differs(a: protocol.AgentStatus | None, b: protocol.AgentStatus | None) -> bool:
    """Whether the reconcile should look again: reachable or not changed, or the state moved."""
    if a is None or b is None:
        return (a is None) != (b is None)
    return a.sequence != b.sequence or a != b


class AgentWatch:
    """The latest status of one pod's agent; `run` keeps it current until cancelled."""

    def __init__(
        self,
        client: AgentClient,
        endpoint: str,
        on_change: Callable[[], None],
        first: protocol.AgentStatus | None,
        long_poll_s: float = LONG_POLL_S,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.status = first
        self._on_change = on_change
        self._long_poll_s = long_poll_s
        self._task: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        self._task = asyncio.create_task(self.run(), name=f"agent watch {name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                if self.status is None:
                    got = await self.client.status(self.endpoint)
                else:
                    got = await self.client.wait_status(
                        self.endpoint, self.status.sequence, self._long_poll_s
                    )
                failures = 0
            except AgentClientError as e:
                log.debug("agent %s: %s", self.endpoint, e)
                got = None
                failures += 1
            if differs(self.status, got):
                self.status = got
                self._on_change()
            else:
                self.status = got
            if got is None:
                await asyncio.sleep(retry_after(failures))  # an unreachable agent: back off
