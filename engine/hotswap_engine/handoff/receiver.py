"""Worker side of the hand-off (inside a vLLM worker, or a plain process owning parameters).

Usage:
    with HandoffReceiver(endpoint, rank, device) as rx:
        version = rx.wait_begin()
        try:
            model.reload_weights(weights_iterator=rx.weights())   # or: for entry, view in rx.slices()
        except Exception as e:
            rx.fail(str(e)); raise
        rx.done()

Each bucket is acknowledged as soon as its bytes were consumed, so the sender can refill the slot:
`weights()` copies a bucket's tensors out of the slot and acks before yielding them (the consumer may
keep them as long as it likes); `slices()` yields views into the slot and acks when the consumer asks
for the entry after a bucket's last one (copy out of the view before advancing, on the current
CUDA stream).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import zmq

from ._socket import close_socket, drain_monitor, make_socket
from .messages import (
    Entry,
    HandoffAborted,
    HandoffError,
    HandoffPeerLost,
    HandoffProtocolError,
    HandoffTimeout,
    MsgType,
    check_endpoint,
    decode,
    encode,
    get_field,
)
from .sender import DEFAULT_TIMEOUT_S
from .slots import TORCH_DTYPES, device_uuid, open_slot

ACK_POLL_SECONDS = 20e-6  # wait between checks of pending copies: a bucket's copy takes ~0.1 ms


class HandoffReceiver:
    def __init__(
        self,
        endpoint: str,
        rank: int,
        device: torch.device | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        check_endpoint(endpoint)
        self.rank = rank
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout = timeout
        self.version: str | None = None
        self._slots: list[torch.Tensor] = []
        self._last_seq = -1
        self._ended = False
        # Buckets whose copies are queued on the GPU but not yet acknowledged: (seq, events). The
        # ack goes out once the events completed, so the worker never blocks its stream per bucket.
        self._unacked: collections.deque[tuple[int, list[torch.cuda.Event]]] = collections.deque()
        self._sock, self._monitor = make_socket(context or zmq.Context.instance(), zmq.DEALER)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._sock.connect(endpoint)
        self._connected = False
        self._closed = False
        self._send(MsgType.HELLO, rank=rank, device_uuid=device_uuid(self.device))

    # -- API -----------------------------------------------------------------------------------

    def wait_begin(self, *, timeout: float | None = None) -> str:
        """Wait for the sender's `begin`, map its slots, return the version being sent."""
        if self.version is not None:
            return self.version
        kind, msg = self._recv(self.timeout if timeout is None else timeout)
        if kind is MsgType.ABORT:
            raise HandoffAborted(str(msg.get("reason", "aborted")))
        if kind is not MsgType.BEGIN:
            raise HandoffProtocolError(f"expected begin, got {kind}")
        version = get_field(msg, "version", str)
        handles = get_field(msg, "slots", list)
        self._slots = [open_slot(h) for h in handles]
        self.version = version
        return version

    def slices(self) -> Iterator[tuple[Entry, torch.Tensor]]:
        """Every entry with a uint8 view of its bytes in the slot, in the sender's order."""
        for seq, slot, entries in self._buckets():
            for e in entries:
                yield e, slot[e.offset : e.offset + e.nbytes]
            self._ack(seq, slot)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors on `self.device` (chunks reassembled), owned by the consumer."""
        partial: dict[str, tuple[torch.Tensor, int]] = {}
        for seq, slot, entries in self._buckets():
            ready: list[tuple[str, torch.Tensor]] = []
            for e in entries:
                src = slot[e.offset : e.offset + e.nbytes]
                if e.whole:
                    ready.append((e.name, _typed(src.to(self.device, copy=True), e)))
                    continue
                buf, got = partial.pop(e.name, (None, 0))
                if buf is None:
                    if e.tensor_offset != 0:
                        raise HandoffProtocolError(f"{e.name}: first chunk at offset {e.tensor_offset}")
                    buf = torch.empty(e.tensor_nbytes, dtype=torch.uint8, device=self.device)
                elif e.tensor_offset != got:
                    raise HandoffProtocolError(f"{e.name}: chunk at {e.tensor_offset}, expected {got}")
                buf[got : got + e.nbytes].copy_(src)
                got += e.nbytes
                if got == e.tensor_nbytes:
                    ready.append((e.name, _typed(buf, e)))
                else:
                    partial[e.name] = (buf, got)
            self._ack(seq, slot)
            yield from ready
        if partial:
            raise HandoffProtocolError(f"stream ended inside tensors {sorted(partial)}")

    def done(self) -> None:
        """Report that everything was applied (after the iterator finished)."""
        if not self._ended:
            raise HandoffError("done() before the sender's end")
        self._flush_acks(wait=True)
        self._send(MsgType.DONE)

    def fail(self, message: str) -> None:
        """Report a failure to the sender, which raises it instead of waiting for a timeout."""
        with contextlib.suppress(zmq.ZMQError):
            self._send(MsgType.ERROR, message=message[:4000])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots = []  # drops the mappings (and CUDA IPC references)
        close_socket(self._sock, self._monitor)

    def __enter__(self) -> HandoffReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _buckets(self) -> Iterator[tuple[int, torch.Tensor, list[Entry]]]:
        self.wait_begin()
        while True:
            kind, msg = self._recv(self.timeout)
            if kind is MsgType.END:
                self._flush_acks(wait=True)
                self._ended = True
                return
            if kind is MsgType.ABORT:
                raise HandoffAborted(f"hand-off aborted by the sender: {msg.get('reason', '')}")
            if kind is not MsgType.BUCKET:
                raise HandoffProtocolError(f"unexpected {kind} during a session")
            seq = get_field(msg, "seq", int)
            index = get_field(msg, "slot", int)
            if seq <= self._last_seq:
                raise HandoffProtocolError(f"bucket seq {seq} after {self._last_seq}")
            if not 0 <= index < len(self._slots):
                raise HandoffProtocolError(f"bucket in slot {index}, only {len(self._slots)} slots")
            slot = self._slots[index]
            entries = [Entry.from_wire(e) for e in get_field(msg, "entries", list)]
            for e in entries:
                e.validate(slot.numel())
            self._last_seq = seq
            yield seq, slot, entries

    def _ack(self, seq: int, slot: torch.Tensor) -> None:
        # Our copies out of the slot must have finished before the sender may overwrite it. On a
        # GPU, an event marks their end and the ack leaves once it completed (`_flush_acks`, polled
        # while waiting for the next message): the copies of the next bucket queue meanwhile.
        events: list[torch.cuda.Event] = []
        for device in {slot.device, self.device}:
            if device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(device))
                events.append(ev)
        if not events:
            self._send(MsgType.ACK, seq=seq)
            return
        self._unacked.append((seq, events))
        self._flush_acks()

    def _flush_acks(self, *, wait: bool = False) -> None:
        """Acknowledge the buckets whose copies completed (all of them with `wait`). Acks are
        cumulative on the sender's side, so one message for the newest completed bucket suffices."""
        newest = -1
        while self._unacked:
            seq, events = self._unacked[0]
            if wait:
                for ev in events:
                    ev.synchronize()
            elif not all(ev.query() for ev in events):
                break
            self._unacked.popleft()
            newest = seq
        if newest >= 0:
            self._send(MsgType.ACK, seq=newest)

    def _send(self, kind: MsgType, **fields: Any) -> None:
        self._sock.send(encode(kind, **fields))

    def _recv(self, timeout: float) -> tuple[MsgType, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        lost = False
        while True:
            try:
                return decode(self._sock.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                pass
            if self._unacked:
                self._flush_acks()
                if self._unacked:  # copies still running: check again soon instead of blocking
                    time.sleep(ACK_POLL_SECONDS)
                    if time.monotonic() < deadline:
                        continue
            # Messages already queued (an abort sent just before the sender closed) come first.
            if lost:
                raise HandoffPeerLost("the hand-off sender's connection closed")
            opened, closed = drain_monitor(self._monitor)
            self._connected = self._connected or opened > 0
            if closed and self.version is not None:
                lost = True
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                state = f"session {self.version}" if self.version else "begin"
                raise HandoffTimeout(f"no hand-off message within {timeout:.1f}s (waiting in {state})")
            self._poller.poll(int(min(left, 0.5) * 1000) + 1)


def _typed(data: torch.Tensor, e: Entry) -> torch.Tensor:
    """Bytes (offset 0 in their own storage, so any alignment holds) as the entry's tensor."""
    return data.view(TORCH_DTYPES[e.dtype]).reshape(e.shape)
