"""Agent side of the hand-off: owns the slots' contents, tells workers what each bucket holds, and
lets the pipeline reuse a slot only once every worker acknowledged it.

Not thread-safe: one thread drives a sender (ZeroMQ sockets are single-threaded).
On any exception from a session call, call `abort(reason)`: it tells the workers, which then raise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from ._socket import close_socket, drain_monitor, make_socket
from .messages import (
    Entry,
    HandoffError,
    HandoffPeerLost,
    HandoffProtocolError,
    HandoffRemoteError,
    HandoffTimeout,
    MsgType,
    check_endpoint,
    decode,
    encode,
    get_field,
)
from .slots import Slot

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
LOSS_GRACE_S = 0.3


class ReadyEvent(Protocol):
    """What `send_bucket` waits on before telling workers the bucket is there (a torch.cuda.Event)."""

    def synchronize(self) -> None: ...


@dataclass
class WorkerInfo:
    rank: int
    device_uuid: str
    acked: int = -1  # highest bucket seq acknowledged
    done: bool = False


@dataclass
class _Session:
    version: str
    slots: Sequence[Slot]
    workers: dict[bytes, WorkerInfo]
    slot_seq: list[int]  # last bucket seq sent through each slot, -1: none
    next_seq: int = 0
    bytes_sent: int = 0
    failure: HandoffError | None = field(default=None)


class HandoffSender:
    def __init__(
        self,
        endpoint: str,
        workers: int = 1,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a hand-off needs at least one worker")
        check_endpoint(endpoint)
        self.workers = workers
        self.timeout = timeout
        self._sock, self._monitor = make_socket(context or zmq.Context.instance(), zmq.ROUTER)
        # Sending to a worker that went away raises instead of dropping silently.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._hellos: dict[int, tuple[bytes, str]] = {}  # rank -> (identity, device uuid); latest wins
        self._live = 0  # open connections, from the monitor
        self._session: _Session | None = None
        self._short_since: float | None = None  # since when fewer connections than workers are open
        self._closed = False

    # -- session API -------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return self._session.version if self._session else None

    def begin(self, version: str, slots: Sequence[Slot], *, timeout: float | None = None) -> None:
        """Wait until `workers` receivers said hello, then hand them the slots."""
        if self._session is not None:
            raise HandoffError(f"session for {self._session.version} still open; end() or abort() it")
        if not slots:
            raise ValueError("begin() needs at least one slot")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        workers: dict[bytes, WorkerInfo] = {}
        try:
            self._begin_workers(version, slots, workers, deadline)
        except BaseException:
            for ident in workers:  # those that got `begin` must not wait for buckets until they time out
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart(
                        [ident, encode(MsgType.ABORT, reason="begin failed")], zmq.NOBLOCK
                    )
            raise
        self._session = _Session(version, slots, workers, [-1] * len(slots))
        self._short_since = None

    def _begin_workers(
        self, version: str, slots: Sequence[Slot], workers: dict[bytes, WorkerInfo], deadline: float
    ) -> None:
        while len(workers) < self.workers:
            self._wait_until(
                lambda: bool(self._hellos),
                max(deadline - time.monotonic(), 0.0),
                lambda: f"only {len(workers)} of {self.workers} hand-off workers connected",
            )
            for rank, (ident, uuid) in sorted(self._hellos.items()):
                del self._hellos[rank]
                if any(w.rank == rank for w in workers.values()):
                    raise HandoffError(f"two hand-off workers with rank {rank}")
                # One handle per receiver: a CUDA IPC handle carries one reference (see CudaSlot.handle).
                payload = encode(MsgType.BEGIN, version=version, slots=[s.handle() for s in slots])
                try:
                    self._sock.send_multipart([ident, payload])
                except zmq.ZMQError:
                    # A hello left by a worker of an earlier update that gave up before any begin
                    # (its connection is gone): wait for this rank's current worker instead.
                    log.info("dropping the stale hand-off hello of rank %d", rank)
                    continue
                workers[ident] = WorkerInfo(rank, uuid)
                if len(workers) > self.workers:
                    raise HandoffError(f"more than {self.workers} hand-off workers connected")

    def wait_workers(self, *, timeout: float | None = None) -> None:
        """Wait until `workers` receivers said hello (begin() does this itself)."""
        self._wait_until(
            lambda: len(self._hellos) >= self.workers,
            self.timeout if timeout is None else timeout,
            lambda: f"only {len(self._hellos)} of {self.workers} hand-off workers connected",
        )

    def connections(self) -> int:
        """Worker connections open now, as the socket monitor reported them (handles pending traffic
        first; a hello that arrived meanwhile is kept for the next begin)."""
        self._pump(0)
        return self._live

    def send_bucket(self, slot: int, entries: Sequence[Entry], ready: ReadyEvent | None = None) -> int:
        """Announce that slot `slot` now holds `entries`; returns the bucket's sequence number.
        The slot must be free (`wait_slot_free`) *before* its bytes were overwritten."""
        s = self._require_session()
        self._pump(0)
        if not 0 <= slot < len(s.slots):
            raise IndexError(f"slot {slot} out of range (0..{len(s.slots) - 1})")
        if not self.slot_free(slot):
            raise HandoffError(
                f"slot {slot} still holds bucket {s.slot_seq[slot]}; call wait_slot_free first"
            )
        size = s.slots[slot].nbytes
        for e in entries:
            e.validate(size)
        if ready is not None:
            ready.synchronize()  # the bytes must be in the slot before any worker reads them
        seq = s.next_seq
        payload = encode(MsgType.BUCKET, slot=slot, seq=seq, entries=[e.to_wire() for e in entries])
        for ident in s.workers:
            self._send(ident, payload)
        s.next_seq += 1
        s.slot_seq[slot] = seq
        s.bytes_sent += sum(e.nbytes for e in entries)
        return seq

    def slot_free(self, slot: int) -> bool:
        s = self._require_session()
        seq = s.slot_seq[slot]
        return all(w.acked >= seq for w in s.workers.values())

    def wait_slot_free(self, slot: int, *, timeout: float | None = None) -> None:
        s = self._require_session()
        wait = self.timeout if timeout is None else timeout

        def late() -> str:
            ranks = sorted(w.rank for w in s.workers.values() if w.acked < s.slot_seq[slot])
            return f"worker rank(s) {ranks} did not acknowledge bucket {s.slot_seq[slot]} (slot {slot})"

        self._wait_until(lambda: self.slot_free(slot), wait, late)

    def end(self, *, timeout: float | None = None) -> None:
        """Tell workers the version is complete and wait until every one applied it."""
        s = self._require_session()
        self._pump(0)
        for ident in s.workers:
            self._send(ident, encode(MsgType.END))
        wait = self.timeout if timeout is None else timeout
        self._wait_until(
            lambda: all(w.done for w in s.workers.values()),
            wait,
            lambda: (
                f"worker rank(s) {sorted(w.rank for w in s.workers.values() if not w.done)} did not finish"
            ),
        )
        self._session = None

    def abort(self, reason: str) -> None:
        """Tell every worker to give up this session (they raise HandoffAborted). No-op without one."""
        s, self._session = self._session, None
        if s is None:
            return
        payload = encode(MsgType.ABORT, reason=reason[:4000])
        for ident in s.workers:
            # A worker that is gone already needs no telling.
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([ident, payload], flags=zmq.NOBLOCK)

    def close(self) -> None:
        if self._closed:
            return
        self.abort("hand-off sender closed")
        self._closed = True
        close_socket(self._sock, self._monitor)

    def __enter__(self) -> HandoffSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _require_session(self) -> _Session:
        if self._session is None:
            raise HandoffError("no hand-off session; call begin() first")
        if self._session.failure is not None:
            raise self._session.failure
        return self._session

    def _send(self, ident: bytes, payload: bytes) -> None:
        try:
            self._sock.send_multipart([ident, payload])
        except zmq.ZMQError as e:
            rank = (
                self._session.workers[ident].rank if self._session and ident in self._session.workers else "?"
            )
            err = HandoffPeerLost(f"hand-off worker rank {rank} is gone ({e})")
            if self._session:
                self._session.failure = err
            raise err from None

    def _wait_until(self, done: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._pump(0)
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandoffTimeout(f"{what()} within {timeout:.1f}s")
            self._pump(min(left, 0.1 if self._short_since is not None else 0.5))

    def _pump(self, wait_s: float) -> None:
        """Wait up to `wait_s` for traffic, handle everything that arrived, raise a session failure."""
        if wait_s > 0:
            self._poller.poll(int(wait_s * 1000) + 1)
        opened, closed = drain_monitor(self._monitor)
        self._live += opened - closed
        while True:
            try:
                ident, frame = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:
                continue  # wrong frame count: not our protocol
            self._handle(ident, frame)
        s = self._session
        if s is not None and s.failure is None:
            self._check_connections(s)
        if s is not None and s.failure is not None:
            raise s.failure

    def _check_connections(self, s: _Session) -> None:
        # Fewer open connections than workers still owing `done` means one of them is gone. A worker
        # that finished may close; the grace period lets its last messages and the monitor's
        # events (two independent queues) settle before we call it lost.
        owing = [w.rank for w in s.workers.values() if not w.done]
        if self._live >= len(owing):
            self._short_since = None
            return
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > LOSS_GRACE_S:
            s.failure = HandoffPeerLost(f"a hand-off worker's connection closed (ranks still owing: {owing})")

    def _handle(self, ident: bytes, frame: bytes) -> None:
        s = self._session
        worker = s.workers.get(ident) if s else None
        try:
            kind, msg = decode(frame)
            if kind is MsgType.HELLO:
                rank = get_field(msg, "rank", int)
                self._hellos[rank] = (ident, str(msg.get("device_uuid", "")))
            elif worker is None:
                log.debug("ignoring %s from a worker outside the session", kind)
            elif kind is MsgType.ACK:
                worker.acked = max(worker.acked, get_field(msg, "seq", int))
            elif kind is MsgType.DONE:
                worker.done = True
            elif kind is MsgType.ERROR:
                raise HandoffRemoteError(f"hand-off worker rank {worker.rank}: {msg.get('message', '?')}")
            else:
                raise HandoffProtocolError(f"unexpected {kind} from a worker")
        except HandoffProtocolError as e:
            if worker is None:
                log.warning("malformed hand-off message from an unknown peer: %s", e)
                return
            assert s is not None
            s.failure = e
        except HandoffRemoteError as e:
            assert s is not None
            s.failure = e

    def stats(self) -> dict[str, Any]:
        s = self._session
        return {"version": s.version, "buckets": s.next_seq, "bytes": s.bytes_sent} if s else {}
