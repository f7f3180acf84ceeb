"""Rank layout of a pod with several GPUs, and the framing of the channel between the agent and its
rank workers (the messages are `hotswap_api.rank_messages`).

Pure code (no torch, no sockets): unit-tested on its own.

Layout: a pod with `local` GPUs runs one rank worker per GPU. In a broadcast of `pods` pods the
group has `pods × local` ranks; pod rank p's local rank l is global rank `p × local + l`, and
global rank 0 (pod rank 0, local rank 0) hosts the group's store at the master address. Every
pod of one group must run the same number of rank workers.

Who broadcasts what: the operator assigns each pod a part of the checkpoint (`PartSpec`), and the
bucket plan gives every bucket one owning part. Inside a pod the buckets of each part are dealt out
to its local ranks round robin (`split_plan`), so each GPU's host→device link moves about
1/local of the pod's part and the device→host copies into the full version are split the same
way. This is done by renaming parts: virtual part `part × local + l` holds the buckets of `part`
that local rank l moves, and it maps to the same host buffer as `part` (so the broadcast pipeline
itself needs no change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from hotswap_api.rank_messages import MAX_FDS, Message, ProtocolError, validate

from hotswap_engine import buckets

FRAME_HEADER = struct.Struct("<I")  # message length; the fds of a message ride on its header
MAX_FRAME_BYTES = 256 << 20


@dataclass(frozen=True)
class RankLayout:
    pod_rank: int
    pods: int
    local: int  # rank workers (GPUs) per pod

    def __post_init__(self) -> None:
        if self.local < 1 or self.pods < 1 or not 0 <= self.pod_rank < self.pods:
            raise ValueError(f"bad rank layout: pod rank {self.pod_rank} of {self.pods}, {self.local} local")

    @property
    def world_size(self) -> int:
        return self.pods * self.local

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.local:
            raise ValueError(f"local rank {local_rank} outside 0..{self.local - 1}")
        return self.pod_rank * self.local + local_rank

    def pod_of(self, global_rank: int) -> int:
        return global_rank // self.local


def member_names(pods: Sequence[str], local: int) -> tuple[str, ...]:
    """Group member names by global rank: `pod/l` (pod names in pod-rank order)."""
    return tuple(f"{pod}/{lr}" for pod in pods for lr in range(local))


@dataclass(frozen=True)
class SplitPlan:
    """A bucket plan whose owners are virtual parts (see the module doc)."""

    plan: buckets.BucketPlan  # bucket owners are virtual parts
    real_part: dict[int, int]  # virtual part -> the real part (host buffer) it reads or fills
    owners: dict[int, int]  # virtual part -> global rank that broadcasts it
    local: int

    def local_rank_of(self, virtual: int) -> int:
        return virtual % self.local

    def parts_of(self, local_rank: int) -> list[int]:
        """The virtual parts local rank `local_rank` moves (copies host→device as owner, and
        device→host into the full version otherwise)."""
        return [v for v in sorted(self.real_part) if v % self.local == local_rank]


def split_plan(
    plan: buckets.BucketPlan,
    pod_parts: Mapping[int, tuple[int, int] | None],
    local: int,
) -> SplitPlan:
    """Deal each part's buckets to the `local` ranks of the pod that broadcasts it.

    `pod_parts` maps pod rank → the part it holds ((index, count), or None for a complete copy), as
    in the update request; `buckets.owners_by_part` picks the pod of each part. The i-th bucket of a
    part (in plan order) goes to local rank i mod `local`: buckets are of equal size except the last
    of a tensor run, so the split is even to within a bucket per part.
    """
    count = len(plan.parts)
    pod_owner = buckets.owners_by_part(pod_parts, count)
    seen: dict[int, int] = {}
    out: list[buckets.Bucket] = []
    for b in plan.buckets:
        i = seen.get(b.owner, 0)
        seen[b.owner] = i + 1
        out.append(dataclasses.replace(b, owner=b.owner * local + i % local))
    parts = tuple(
        buckets.PartLayout(p.part * local + lr, p.placements, p.nbytes)
        for p in sorted(plan.parts, key=lambda p: p.part)
        for lr in range(local)
    )
    virtual = buckets.BucketPlan(plan.bucket_bytes, plan.alignment, parts, tuple(out))
    real_part = {p.part: p.part // local for p in parts}
    owners = {v: pod_owner[real] * local + v % local for v, real in real_part.items()}
    return SplitPlan(virtual, real_part, owners, local)


# ---- wire format -----------------------------------------------------------------------------


# The messages themselves (one pydantic model per op, checked on decode in both directions) are
# `hotswap_api.rank_messages`; this module frames them (msgpack, never pickle) and moves them.


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: a little-endian length and a msgpack map (never pickle)."""
    body = msgpack.packb(dict(message), use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes is too large")
    return FRAME_HEADER.pack(len(body)) + body


def decode_typed(body: bytes) -> Message:
    """A frame's body as its typed message (`validate`). Raises `ProtocolError` and nothing else,
    whatever the bytes."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises ValueError, TypeError, its own errors, RecursionError...
        raise ProtocolError(f"undecodable message: {type(e).__name__}: {e}") from None
    return validate(message)


def decode(body: bytes) -> dict[str, Any]:
    """A frame's body as a checked message: a dict with exactly its op's fields, defaults filled in."""
    return decode_typed(body).model_dump()


class FrameTooLarge(ProtocolError):
    """A frame header announced more than MAX_FRAME_BYTES: the stream cannot be resynchronised."""


def frame_length(header: bytes) -> int:
    (n,) = FRAME_HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {n} bytes announced: too large")
    return int(n)


def parts_to_wire(parts: Mapping[int, tuple[int, int] | None]) -> list[list[int] | None]:
    """`{rank: (index, count) | None}` for ranks 0..n-1 as a list (msgpack keeps it simple)."""
    if sorted(parts) != list(range(len(parts))):
        raise ValueError(f"ranks must be 0..{len(parts) - 1}, got {sorted(parts)}")
    return [None if parts[r] is None else list(parts[r] or ()) for r in range(len(parts))]


def parts_from_wire(wire: Sequence[Sequence[int] | None]) -> dict[int, tuple[int, int] | None]:
    out: dict[int, tuple[int, int] | None] = {}
    for rank, held in enumerate(wire):
        if held is None:
            out[rank] = None
        elif len(held) == 2:
            out[rank] = (int(held[0]), int(held[1]))
        else:
            raise ProtocolError(f"rank {rank}: a part is [index, count], got {held!r}")
    return out


# ---- socket I/O (a unix socketpair; fds travel as SCM_RIGHTS on a frame's header) ----------------


def send_message(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    frame = encode(message)
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The next message (as a checked dict) and the fds that came with it. Raises EOFError when the
    peer is gone."""
    message, fds = recv_typed(sock)
    return message.model_dump(), fds


def recv_typed(sock: socket.socket) -> tuple[Message, list[int]]:
    """The next message (typed) and the fds that came with it. Raises EOFError when the peer is gone."""
    fds: list[int] = []
    header = b""
    while len(header) < FRAME_HEADER.size:
        data, got, _flags, _addr = socket.recv_fds(sock, FRAME_HEADER.size - len(header), MAX_FDS)
        fds.extend(got)
        if not data:
            _close_all(fds)
            raise EOFError("the peer closed the channel")
        header += data
    try:
        n = frame_length(header)
    except ProtocolError:
        _close_all(fds)
        raise
    body = bytearray()
    while len(body) < n:
        chunk = sock.recv(min(n - len(body), 1 << 20))
        if not chunk:
            _close_all(fds)
            raise EOFError("the peer closed the channel mid-message")
        body += chunk
    try:
        return decode_typed(bytes(body)), fds
    except ProtocolError:
        _close_all(fds)
        raise


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
