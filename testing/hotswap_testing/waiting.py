"""Waiting on a condition in tests: poll it until it holds, fail after a timeout with a message saying
what did not happen (and, optionally, why: `explain()` and the last value the probe returned).

A test synchronises on what it waits for, never on time: `wait_for(lambda: pod_ready(), 60, "pod
Ready")`, not `time.sleep(5)`. The short polling interval inside is the only sleep a test needs. A
probe may raise to fail at once (a process that exited will never become ready).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

INTERVAL_S = 0.1


class WaitTimeout(AssertionError):
    """The condition did not hold within the timeout."""


def _message(what: str, timeout: float, last: Any, explain: Callable[[], str] | None) -> str:
    text = f"timed out after {timeout:g}s waiting for {what} (last probe result: {last!r:.300})"
    if explain is not None:
        text += "\n" + explain()
    return text


def wait_for(
    probe: Callable[[], T],
    timeout: float,
    what: str,
    explain: Callable[[], str] | None = None,
    interval: float = INTERVAL_S,
) -> T:
    """Call `probe` until it returns something truthy and return that; raise WaitTimeout naming `what`
    after `timeout` seconds. Exceptions from the probe propagate (fail fast)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(_message(what, timeout, value, explain))
        time.sleep(interval)


async def wait_for_async(
    probe: Callable[[], Awaitable[T]],
    timeout: float,
    what: str,
    explain: Callable[[], str] | None = None,
    interval: float = INTERVAL_S,
) -> T:
    """`wait_for` for coroutines: awaits `probe()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(_message(what, timeout, value, explain))
        await asyncio.sleep(interval)
