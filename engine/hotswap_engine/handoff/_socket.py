"""ZeroMQ plumbing shared by both ends: socket options and connection-loss detection.

A dead peer must surface as an exception within a bounded time. Two mechanisms cover it:
the socket monitor reports a closed connection at once (a killed process closes its sockets), and
ZMTP heartbeats close connections whose peer hangs without closing (then the monitor reports it).
Every wait also has a timeout as the last resort.
"""

from __future__ import annotations

import contextlib

import zmq
from zmq.utils.monitor import recv_monitor_message

HEARTBEAT_INTERVAL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
# Long enough to flush a final ack/done/abort on close, short enough never to stall a shutdown.
LINGER_MS = 1000


def make_socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A socket with heartbeats and its monitor (created before bind/connect so no event is missed)."""
    sock: zmq.Socket[bytes] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_INTERVAL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    return sock, monitor


def drain_monitor(monitor: zmq.Socket[bytes]) -> tuple[int, int]:
    """(connections opened, connections closed) reported since the last call."""
    opened = closed = 0
    while True:
        try:
            event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return opened, closed
        if event["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
            opened += 1
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            closed += 1


def close_socket(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    monitor.close(linger=0)
    sock.close()
