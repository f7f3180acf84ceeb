"""Pacing of a transfer to a byte rate (`maxBytesPerSecond`): broadcast buckets and p2p reads."""

from __future__ import annotations

import time


class Pacer:
    """Sleeps so that `done` bytes take at least done / rate seconds since the first call.
    A rate of None (or 0) means unpaced."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.t0: float | None = None

    def wait(self, done: int) -> None:
        if not self.rate:
            return
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        ahead = done / self.rate - (now - self.t0)
        if ahead > 0:
            time.sleep(ahead)
