"""The agent's change sequence: what `GET /v1/status?waitForChangeAfter=N` waits on.

Every change of the state the status reports (a version staged or dropped, an update started,
moving to another stage, finished; the engine coming up or going away) bumps `sequence` by one
and wakes every waiter at once. Waiting is an asyncio event per generation, never a sleep loop, so
an operator learns that staging or an update finished when it finishes, with one open request per
pod. Byte progress (`bytes_done`) is not a change: it would wake the operator for every bucket.
"""

from __future__ import annotations

import asyncio
import threading

from hotswap_api import protocol

# Upper bound of one long-poll (an agent may be configured lower: --max-status-wait).
MAX_WAIT_S = protocol.MAX_STATUS_WAIT_SECONDS
# While someone waits and the engine is not up (vLLM still loading), the agent asks its launcher
# this often — a local socket, not the operator's network path — so that "the engine came up" is a
# change too.
ENGINE_CHECK_S = 1.0


class ChangeFeed:
    """A monotonic sequence with waiters; `bump` may be called from any thread."""

    def __init__(self) -> None:
        self._sequence = 0
        self._lock = threading.Lock()
        self._event: asyncio.Event | None = None  # the current generation's, created by a waiter
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sequence(self) -> int:
        return self._sequence

    def bump(self) -> None:
        with self._lock:
            self._sequence += 1
            event, loop = self._event, self._loop
            self._event = None
        if event is None or loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    def changed_since(self, after: int) -> bool:
        """Whether the state moved past `after`. A sequence from the future (the agent restarted
        and counts from 0 again) counts as a change: the client's view is stale."""
        return self._sequence != after

    async def wait(self, after: int, timeout_s: float) -> bool:
        """Return True as soon as the sequence moves past `after`, False at `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while not self.changed_since(after):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with self._lock:
                if self._event is None:
                    self._event, self._loop = asyncio.Event(), loop
                event = self._event
            if self.changed_since(after):  # bumped between the check and taking the event
                return True
            try:
                await asyncio.wait_for(event.wait(), timeout=remaining)
            except TimeoutError:
                return self.changed_since(after)
        return True
