"""The pipelined broadcast: every member ends with every bucket in its workers and in host memory.

Per bucket (in plan order, identical on every member):
  1. the owner copies the bucket's bytes from its staged host buffer into a slot (copy stream),
  2. the group broadcasts the slot from the owner (the backend's stream, ordered after 1),
  3. every member announces the slot to its workers (`HandoffSender.send_bucket`), and copies the
     bucket into its host buffer for that part (device→host stream), so after the update every
     member holds the *full* version: the rollback source and a complete peer-to-peer source.
     A member's own part needs no copy: its staged buffer already is that part.
Slots rotate; a slot is refilled only after the workers acknowledged it (`wait_slot_free`) and its
device→host copy finished (a CUDA event the next writer's stream waits on). The host never
synchronises the device per bucket: it polls events, and keeps up to `slots` buckets in flight.

`trail_full=True` moves step 3's device→host copy off the update's critical path: the hand-off pass
runs without it (the owners' host→GPU copies then have the host link to themselves), the workers
apply and report `done`, and only then a second, trailing pass broadcasts every bucket again and
copies it into the full-version buffers. That pass needs no acks and no host synchronisation per
bucket (stream-ordered only), and reuses the same slots, so it takes no extra GPU memory. Every
member of a group must use the same setting (it adds collectives).

The first update on a new group would pay NCCL's lazy connection set-up for large messages inside
its first buckets; `warm_up` (called by `run` once per group, or by the caller right after the group
was formed) broadcasts one slot from every rank first.

On CPU (gloo) the same loop and the same per-bucket step run with shared-memory slots: copies are
plain memcpy and the broadcast runs on gloo's threads (`_HostMover` beside `_CudaMover`).

Any failure (a collective's error or timeout, a worker's error, a member that signalled abort)
aborts the hand-off session and the group, and raises `BroadcastError` within the op timeout.
"""

from __future__ import annotations

import collections
import functools
import gc
import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

import torch
import torch.distributed as dist

from hotswap_engine import buckets
from hotswap_engine.handoff import Entry, HandoffSender, Slot, create_slots
from hotswap_engine.handoff.slots import DEFAULT_SHM_DIR
from hotswap_engine.hostmem import HostBuffer, HostBufferPool
from hotswap_engine.staging import StagedCheckpoint
from hotswap_engine.transport.process_group import Group, GroupError

log = logging.getLogger(__name__)

POLL_SECONDS = 50e-6  # host wait between event polls: well under a bucket's copy time
ABORT_CHECK_SECONDS = 0.2  # how often a waiting member asks the store whether another one gave up


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _gc_paused(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `fn` with Python's cyclic garbage collector off: a full collection (hundreds of
    thousands of objects once torch is loaded) in the middle of an update stalls the bucket loop
    by up to ~0.2 s, measured on the first 32B-shaped update. Collection resumes afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


class BroadcastError(RuntimeError):
    """The update failed on this member or on another one; the group was discarded."""


@dataclass
class BroadcastStats:
    buckets: int = 0
    bytes: int = 0  # bytes this member handed to its workers (the whole update)
    owned_bytes: int = 0  # bytes this member copied host→slot and broadcast as root
    seconds: float = 0.0  # wall time of the bucket loop (begin to the workers' last ack)
    end_seconds: float = 0.0  # waiting for the workers' `done` after the last bucket
    host_to_slot_seconds: float = 0.0  # device time of the owner's copies (CUDA events; CPU: wall)
    broadcast_seconds: float = 0.0  # device time from a bucket's broadcast start to its arrival
    slot_to_host_seconds: float = 0.0  # device time of the copies into the full-version buffers
    wait_ready_seconds: float = 0.0  # host time spent waiting for broadcasts to land
    wait_free_seconds: float = 0.0  # host time spent waiting for workers' acks
    bucket_bytes: int = 0
    slots: int = 0
    handoff_seconds: float = 0.0  # from `run`'s start until the workers' `done` (the update proper)
    send_seconds: float = 0.0  # host time in `send_bucket` (ZeroMQ announcements)
    warmup_seconds: float = 0.0  # `warm_up` inside this run (0 when the group was warm already)
    drain_seconds: float = 0.0  # after the last announcement, waiting for the workers' last acks
    gpu_span_seconds: float = 0.0  # device time from the first host→slot copy to the last arrival
    trail_seconds: float = 0.0  # wall time of the trailing full-version pass (trail_full)
    trail_host_to_slot_seconds: float = 0.0
    trail_slot_to_host_seconds: float = 0.0
    trail_gpu_span_seconds: float = 0.0
    # Per bucket (CUDA only), ms from the pass's first event: [index, root, MiB, h2d_start, h2d_end,
    # bcast_start, arrived, d2h_end, host_announced]; -1 where a step did not happen on this member.
    timeline: list[list[float]] = field(default_factory=list)
    trail_timeline: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if not isinstance(v, list)}


@dataclass(frozen=True)
class _BucketJob:
    bucket: buckets.Bucket
    root: int  # rank that broadcasts it
    entries: tuple[Entry, ...]


def bucket_entries(plan: buckets.BucketPlan, staged: StagedCheckpoint) -> list[tuple[Entry, ...]]:
    """Hand-off entries of every bucket: the plan's chunks with dtype and shape from the specs."""
    specs = {s.name: s for s in staged.specs}
    out = []
    for b in plan.buckets:
        out.append(
            tuple(
                Entry(
                    c.name,
                    specs[c.name].dtype,
                    tuple(specs[c.name].shape),
                    c.offset,
                    c.nbytes,
                    c.tensor_offset,
                    c.tensor_nbytes,
                )
                for c in b.chunks
            )
        )
    return out


def make_plan(
    staged: StagedCheckpoint,
    memory_budget_bytes: int,
    *,
    reassemble: bool = True,
    fixed: tuple[int, int] | None = None,
) -> tuple[buckets.BucketPlan, buckets.Layout]:
    """The plan every member derives from the same headers and budget (so all agree on it).
    `fixed` = (bucket_bytes, slots) overrides the choice (tests and benchmarks)."""
    items = staged.items()
    largest = max((i.nbytes for i in items), default=0)
    if fixed is not None:
        bucket_bytes, slots = fixed
        plan = buckets.plan_buckets(items, bucket_bytes, staged.alignment)
        return plan, buckets.Layout(bucket_bytes, slots, plan.largest_chunked_tensor if reassemble else 0)
    part_max = max(
        (buckets.layout_part(items, p, staged.alignment).nbytes for p in range(staged.part_count)), default=0
    )
    layout = buckets.choose_layout(
        memory_budget_bytes, largest, part_max, alignment=staged.alignment, reassemble=reassemble
    )
    return buckets.plan_buckets(items, layout.bucket_bytes, staged.alignment), layout


def allocate_full_version(
    staged: StagedCheckpoint,
    plan: buckets.BucketPlan,
    pinned: bool | None = None,
    pool: HostBufferPool | None = None,
) -> dict[int, HostBuffer]:
    """Host buffers for the parts this member does not hold (the broadcast fills them)."""
    out = {}
    for p in plan.parts:
        if p.part not in staged.segments:
            if pool is not None:
                buffer = pool.acquire(p.nbytes, defer_pin=True)
            else:
                buffer = HostBuffer(p.nbytes, pinned=pinned, defer_pin=True)
            if buffer.pinned and not buffer.is_pinned:
                buffer.populate()  # fault the pages in on all threads, then pin (much faster)
                buffer.pin()
            out[p.part] = buffer
    return out


def complete_version(staged: StagedCheckpoint, filled: Mapping[int, HostBuffer]) -> StagedCheckpoint:
    """The full version after a broadcast: this member's staged buffer plus the filled ones."""
    segments = dict(staged.segments)
    segments.update(filled)
    return StagedCheckpoint(staged.specs, staged.assignment, staged.part_count, segments, staged.alignment)


def _bucket_jobs(
    rank: int, staged: StagedCheckpoint, plan: buckets.BucketPlan, owners: Mapping[int, int]
) -> list[_BucketJob]:
    """Every bucket with the rank that broadcasts it; refuses a plan this member cannot serve."""
    if staged.part_count != len(plan.parts):
        raise BroadcastError(f"staged as {staged.part_count} parts, but the plan has {len(plan.parts)}")
    jobs = [
        _BucketJob(b, owners[b.owner], e)
        for b, e in zip(plan.buckets, bucket_entries(plan, staged), strict=True)
    ]
    for job in jobs:
        if job.root == rank and job.bucket.owner not in staged.segments:
            raise BroadcastError(f"rank {rank} broadcasts part {job.bucket.owner} but has not staged it")
    return jobs


def _check_full_out(
    staged: StagedCheckpoint, plan: buckets.BucketPlan, full_out: Mapping[int, HostBuffer]
) -> None:
    for p in plan.parts:
        if p.part not in staged.segments and p.part in full_out and full_out[p.part].nbytes < p.nbytes:
            raise BroadcastError(f"full-version buffer for part {p.part} is smaller than the part")


class _Deadline:
    def __init__(self, seconds: float, group: Group) -> None:
        self.seconds = seconds
        self.group = group
        self._next_check = time.monotonic() + ABORT_CHECK_SECONDS

    def wait(self, done: Callable[[], bool], what: str) -> float:
        """Poll `done` until true; raise on the op timeout or another member's abort. Returns the wait."""
        if done():
            return 0.0
        start = time.monotonic()
        limit = start + self.seconds
        while not done():
            now = time.monotonic()
            if now > limit:
                raise BroadcastError(f"timed out after {self.seconds:.1f}s waiting for {what}")
            if now >= self._next_check:
                self._next_check = now + ABORT_CHECK_SECONDS
                reason = self.group.abort_requested()
                if reason is not None:
                    raise BroadcastError(f"another member aborted the update: {reason}")
            time.sleep(POLL_SECONDS)
        return time.monotonic() - start


class BroadcastTransport:
    """Slots and streams of one rank worker, reused across updates (no allocation or IPC
    registration on the hot path of later updates). The group comes from a `GroupCache`."""

    def __init__(self, device: torch.device, shm_dir: str | os.PathLike[str] = DEFAULT_SHM_DIR) -> None:
        self.device = device
        self.shm_dir = shm_dir  # CPU slots' directory (a tmpfs shared with the workers)
        self.cuda = device.type == "cuda"
        self._slots: list[Slot] = []
        self._warm: tuple[weakref.ReferenceType[Group], int] | None = None  # (group, bytes) warmed
        if self.cuda:
            # The update's own work on high-priority streams; the full-version copies on a
            # low-priority one (priority 0 is the lowest torch offers).
            self.copy_stream = torch.cuda.Stream(device, priority=-1)
            self.comm_stream = torch.cuda.Stream(device, priority=-1)
            self.d2h_stream = torch.cuda.Stream(device, priority=0)

    def slots(self, count: int, nbytes: int) -> list[Slot]:
        if len(self._slots) != count or any(s.nbytes != nbytes for s in self._slots):
            self.close()
            self._slots = create_slots(count, nbytes, self.device, self.shm_dir)
        return self._slots

    def close(self) -> None:
        for s in self._slots:
            s.close()
        self._slots = []

    def warm_up(self, group: Group, nbytes: int, *, slots: int = 1) -> float:
        """Broadcast `nbytes` from every rank twice, so NCCL sets up its connections for large
        messages (it does so lazily, per protocol) before the first update, not inside it. Uses
        this transport's slots (allocating `slots` of `nbytes` if there are none yet, so it takes no
        memory beyond them). Idempotent per (group, size); returns the seconds it took."""
        if not self.cuda or group.spec.world_size < 2 or nbytes <= 0:
            return 0.0
        if self._warm is not None and self._warm[0]() is group and self._warm[1] >= nbytes:
            return 0.0
        t = time.perf_counter()
        if not self._slots or self._slots[0].nbytes < nbytes:
            self.slots(max(slots, 1), nbytes)
        view = self._slots[0].tensor[:nbytes]
        try:
            with torch.cuda.stream(self.comm_stream):
                for _ in range(2):
                    for root in range(group.spec.world_size):
                        group.broadcast(view, root).wait()
            done = _record(self.comm_stream)
            _Deadline(group.timeout, group).wait(done.query, "the warm-up broadcasts")
        except GroupError as e:
            raise BroadcastError(f"warm-up failed: {e}") from e
        self._warm = (weakref.ref(group), nbytes)
        return time.perf_counter() - t

    @_gc_paused
    def run(
        self,
        group: Group,
        staged: StagedCheckpoint,
        plan: buckets.BucketPlan,
        owners: Mapping[int, int],
        sender: HandoffSender,
        version: str,
        *,
        slots: int,
        full_out: Mapping[int, HostBuffer] | None = None,
        progress: Callable[[int], None] | None = None,
        op_timeout: float = 60.0,
        end: bool = True,
        begin: bool = True,
        trail_full: bool = False,
    ) -> BroadcastStats:
        """Move every bucket of `plan` into this member's workers (and `full_out`).

        `owners` maps part → the rank that broadcasts it; buckets whose owner is this rank are read
        from `staged`. `full_out` maps each part this member does not hold to a host buffer of the
        part's size. With `end`, waits for the workers' `done` after the last bucket. With
        `trail_full` (the same on every member), `full_out` is filled by a second pass after the
        workers' `done` (see the module docstring); without `end` that pass runs right after the
        hand-off pass, before the caller ends the session.
        """
        t_entry = time.perf_counter()
        stats = BroadcastStats(bucket_bytes=plan.bucket_bytes, slots=slots)
        jobs = _bucket_jobs(group.rank, staged, plan, owners)
        full_out = dict(full_out or {})
        _check_full_out(staged, plan, full_out)
        slot_list = self.slots(slots, plan.bucket_bytes)
        deadline = _Deadline(op_timeout, group)
        inline_full = {} if trail_full else full_out
        t0 = time.perf_counter()
        try:
            if begin:  # else the caller began the session with `self.slots(...)` already
                sender.begin(version, slot_list, timeout=op_timeout)
            stats.warmup_seconds = self.warm_up(group, plan.bucket_bytes)
            self._handoff_pass(group, staged, jobs, slot_list, sender, inline_full, progress, deadline, stats)
            stats.seconds = time.perf_counter() - t0
            if end:
                t1 = time.perf_counter()
                sender.end(timeout=op_timeout)
                stats.end_seconds = time.perf_counter() - t1
            stats.handoff_seconds = time.perf_counter() - t_entry
            if trail_full:
                t2 = time.perf_counter()
                self._trailing_pass(group, staged, jobs, slot_list, full_out, deadline, stats)
                stats.trail_seconds = time.perf_counter() - t2
        except BaseException as e:
            reason = f"rank {group.rank}: {type(e).__name__}: {e}"
            log.warning("broadcast failed, aborting: %s", reason)
            sender.abort(reason)  # first: the local workers stop waiting at once
            group.signal_abort(reason)
            group.abort()
            if isinstance(e, BroadcastError):
                raise
            if isinstance(e, Exception):
                raise BroadcastError(reason) from e
            raise
        return stats

    # ---- the passes: one per-bucket step, one loop per pass, on CPU and CUDA alike ------------------
    #
    # What differs by device sits in a `_BucketMover` (`_HostMover` for gloo and shared-memory slots,
    # `_CudaMover` for NCCL and CUDA IPC slots): `move` is the per-bucket step (the owner's copy into
    # the slot, the broadcast, the copy kept for the full version), `landed`/`settle` say when the
    # workers may be told. What stays split, and why: on CUDA the whole step is enqueued on streams
    # (host→slot on the copy stream, the broadcast on the comm stream, slot→host on the d2h stream,
    # ordered by events) and the host only polls the arrival event, so the full-version copy never
    # delays an announcement; on CPU the copies are the host's own memcpy, so the full-version copy
    # runs when the bucket has landed (in `settle`), before it is announced.

    def _mover(
        self, group: Group, slot_list: Sequence[Slot], stats: BroadcastStats, *, trail: bool
    ) -> _BucketMover:
        if self.cuda:
            return _CudaMover(self, group, len(slot_list), stats, trail=trail)
        return _HostMover(group, stats, trail=trail)

    def _handoff_pass(
        self,
        group: Group,
        staged: StagedCheckpoint,
        jobs: Sequence[_BucketJob],
        slot_list: Sequence[Slot],
        sender: HandoffSender,
        full_out: Mapping[int, HostBuffer],
        progress: Callable[[int], None] | None,
        deadline: _Deadline,
        stats: BroadcastStats,
    ) -> None:
        """Every bucket into the workers (and `full_out`): up to `len(slot_list)` buckets in flight,
        a slot refilled once the workers acknowledged it."""
        nslots = len(slot_list)
        mover = self._mover(group, slot_list, stats, trail=False)
        pending: collections.deque[_Moved] = collections.deque()

        def announce(moved: _Moved) -> None:
            # A collective that failed is aborted by our deadline (or NCCL's watchdog at the same
            # timeout), which raises here before the bucket is announced.
            stats.wait_ready_seconds += mover.settle(moved, deadline)
            t = time.perf_counter()
            sender.send_bucket(moved.index % nslots, moved.job.entries)
            mover.announced(moved, t)
            stats.send_seconds += time.perf_counter() - t
            stats.buckets += 1
            stats.bytes += moved.job.bucket.nbytes
            if progress is not None:
                progress(stats.bytes)

        for index, job in enumerate(jobs):
            slot = index % nslots
            while pending and pending[0].index <= index - nslots:
                announce(pending.popleft())
            if index >= nslots and not sender.slot_free(slot):
                t = time.perf_counter()
                sender.wait_slot_free(slot, timeout=deadline.seconds)
                stats.wait_free_seconds += time.perf_counter() - t
            b = job.bucket
            owned = job.root == group.rank and b.nbytes > 0
            if owned:
                stats.owned_bytes += b.nbytes
            pending.append(
                mover.move(
                    index,
                    job,
                    slot_list[slot].tensor[: b.nbytes],
                    src=_part_slice(staged.segments[b.owner], b) if owned else None,
                    keep=full_out.get(b.owner) if b.nbytes else None,
                )
            )
            while pending and mover.landed(pending[0]):
                announce(pending.popleft())
        while pending:
            announce(pending.popleft())
        t = time.perf_counter()
        for slot in range(nslots):
            sender.wait_slot_free(slot, timeout=deadline.seconds)
        stats.drain_seconds = time.perf_counter() - t
        mover.finish(deadline, "the last device→host copies")

    def _trailing_pass(
        self,
        group: Group,
        staged: StagedCheckpoint,
        jobs: Sequence[_BucketJob],
        slot_list: Sequence[Slot],
        full_out: Mapping[int, HostBuffer],
        deadline: _Deadline,
        stats: BroadcastStats,
    ) -> None:
        """The trailing full-version pass: every bucket broadcast again and kept where this member
        lacks it; no acks (the workers are done), and on CUDA no host wait until the end."""
        mover = self._mover(group, slot_list, stats, trail=True)
        for index, job in enumerate(jobs):
            b = job.bucket
            if not b.nbytes:
                continue
            moved = mover.move(
                index,
                job,
                slot_list[index % len(slot_list)].tensor[: b.nbytes],
                src=_part_slice(staged.segments[b.owner], b) if job.root == group.rank else None,
                keep=full_out.get(b.owner) if job.root != group.rank else None,
            )
            mover.trail(moved, deadline)
        mover.finish(deadline, "the trailing full-version pass")


@dataclass
class _CudaTimes:
    index: int = 0
    root: int = 0
    nbytes: int = 0
    h2d_start: torch.cuda.Event | None = None
    h2d_end: torch.cuda.Event | None = None
    bcast_start: torch.cuda.Event | None = None
    arrived: torch.cuda.Event = field(default_factory=torch.cuda.Event)
    d2h_end: torch.cuda.Event | None = None
    announced: float = -1.0  # host seconds from the pass's start when the workers were told


def _part_slice(buffer: HostBuffer, b: buckets.Bucket) -> torch.Tensor:
    return buffer.tensor[b.host_offset : b.host_offset + b.nbytes]


@dataclass
class _Moved:
    """A bucket on its way: broadcast started, maybe landed."""

    index: int
    job: _BucketJob
    view: torch.Tensor  # the slot's bytes
    keep: HostBuffer | None  # the full-version buffer to copy it into (CPU: when it landed)
    work: dist.Work | None = None  # CPU: the broadcast in flight
    times: _CudaTimes | None = None  # CUDA: its events


class _BucketMover(Protocol):
    def move(
        self,
        index: int,
        job: _BucketJob,
        view: torch.Tensor,
        *,
        src: torch.Tensor | None,
        keep: HostBuffer | None,
    ) -> _Moved:
        """Owner: copy `src` into the slot; all: broadcast it from the root; keep a copy in `keep`."""

    def landed(self, moved: _Moved) -> bool:
        """Whether the bucket is in the slot (polls, never blocks)."""

    def settle(self, moved: _Moved, deadline: _Deadline) -> float:
        """Wait until it landed (and on CPU keep its copy); the seconds waited."""

    def announced(self, moved: _Moved, at: float) -> None: ...

    def trail(self, moved: _Moved, deadline: _Deadline) -> None:
        """After a trailing-pass move: what must happen before the slot is reused."""

    def finish(self, deadline: _Deadline, what: str) -> None:
        """The pass's copies landed; its stats are in."""


class _HostMover:
    """gloo and shared-memory slots: the copies are the host's memcpy, the broadcast runs on gloo's
    threads (polled, so several buckets are in flight)."""

    def __init__(self, group: Group, stats: BroadcastStats, *, trail: bool) -> None:
        self.group = group
        self.stats = stats
        self.trailing = trail  # the trailing pass keeps no timings

    def move(
        self,
        index: int,
        job: _BucketJob,
        view: torch.Tensor,
        *,
        src: torch.Tensor | None,
        keep: HostBuffer | None,
    ) -> _Moved:
        if src is not None:
            t = time.perf_counter()
            view.copy_(src)
            if not self.trailing:
                self.stats.host_to_slot_seconds += time.perf_counter() - t
        work = (
            self.group.broadcast(view, job.root)
            if job.bucket.nbytes and self.group.spec.world_size > 1
            else None
        )
        return _Moved(index, job, view, keep, work=work)

    def landed(self, moved: _Moved) -> bool:
        return moved.work is None or bool(moved.work.is_completed())

    def settle(self, moved: _Moved, deadline: _Deadline) -> float:
        waited = 0.0
        if moved.work is not None:
            what = f"bucket {moved.index}'s {'trailing ' if self.trailing else ''}broadcast"
            waited = deadline.wait(moved.work.is_completed, what)
            moved.work.wait()  # completed already: returns at once, or raises the backend's error
        if moved.keep is not None:
            b = moved.job.bucket
            t = time.perf_counter()
            moved.keep.tensor[b.host_offset : b.host_offset + b.nbytes].copy_(moved.view)
            if not self.trailing:
                self.stats.slot_to_host_seconds += time.perf_counter() - t
        return waited

    def announced(self, moved: _Moved, at: float) -> None:
        pass

    def trail(self, moved: _Moved, deadline: _Deadline) -> None:
        self.settle(moved, deadline)  # one bucket at a time: the slot is reused right away

    def finish(self, deadline: _Deadline, what: str) -> None:
        pass


class _CudaMover:
    """NCCL and CUDA IPC slots on three streams: host→slot (copy stream), broadcast (comm
    stream), slot→host (d2h stream), ordered by events; the host never synchronises per bucket."""

    def __init__(
        self, transport: BroadcastTransport, group: Group, nslots: int, stats: BroadcastStats, *, trail: bool
    ) -> None:
        self.t = transport
        self.group = group
        self.stats = stats
        self.trailing = trail
        self.multi = group.spec.world_size > 1
        # free[s]: the last use of slot s on this device finished (broadcast, and the device→host
        # copy where there is one); the next writer of the slot waits on it.
        self.free = [torch.cuda.Event() for _ in range(nslots)]
        for ev in self.free:
            ev.record(transport.comm_stream)
        transport.copy_stream.wait_stream(transport.comm_stream)
        self.origin = _record(transport.copy_stream)  # the timeline's zero
        self.host_origin = time.perf_counter()
        self.timing: list[_CudaTimes] = []

    def move(
        self,
        index: int,
        job: _BucketJob,
        view: torch.Tensor,
        *,
        src: torch.Tensor | None,
        keep: HostBuffer | None,
    ) -> _Moved:
        t, b = self.t, job.bucket
        slot = index % len(self.free)
        times = _CudaTimes(index=index, root=job.root, nbytes=b.nbytes)
        if src is not None:
            t.copy_stream.wait_event(self.free[slot])
            times.h2d_start = _record(t.copy_stream)
            with torch.cuda.stream(t.copy_stream):
                view.copy_(src, non_blocking=True)
            times.h2d_end = _record(t.copy_stream)
            t.comm_stream.wait_event(times.h2d_end)
        else:
            t.comm_stream.wait_event(self.free[slot])
        times.bcast_start = _record(t.comm_stream)
        if b.nbytes and self.multi:
            with torch.cuda.stream(t.comm_stream):
                self.group.broadcast(view, job.root).wait()  # the comm stream waits; the host does not
        # Arrival is marked on the comm stream, so a bucket's hand-off never waits behind the
        # device→host copy of an earlier one.
        times.arrived = _record(t.comm_stream)
        if keep is not None:
            t.d2h_stream.wait_event(times.arrived)
            with torch.cuda.stream(t.d2h_stream):
                keep.tensor[b.host_offset : b.host_offset + b.nbytes].copy_(view, non_blocking=True)
            times.d2h_end = _record(t.d2h_stream)
            self.free[slot].record(t.d2h_stream)
        else:
            self.free[slot].record(t.comm_stream)
        self.timing.append(times)
        return _Moved(index, job, view, keep, times=times)

    def landed(self, moved: _Moved) -> bool:
        assert moved.times is not None
        return bool(moved.times.arrived.query())

    def settle(self, moved: _Moved, deadline: _Deadline) -> float:
        assert moved.times is not None
        if moved.times.arrived.query():
            return 0.0
        return deadline.wait(moved.times.arrived.query, f"bucket {moved.index}'s broadcast")

    def announced(self, moved: _Moved, at: float) -> None:
        assert moved.times is not None
        moved.times.announced = at - self.host_origin

    def trail(self, moved: _Moved, deadline: _Deadline) -> None:
        pass  # stream-ordered: the next writer of the slot waits on its `free` event

    def finish(self, deadline: _Deadline, what: str) -> None:
        t = self.t
        # The full-version copies must have landed before the caller uses the buffers.
        if self.trailing:
            t.d2h_stream.wait_stream(t.comm_stream)
        done = _record(t.d2h_stream)
        deadline.wait(done.query, what)
        if not self.trailing:
            t.comm_stream.synchronize()
        _summarize(self.origin, self.timing, self.stats, trail=self.trailing)


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def _summarize(
    origin: torch.cuda.Event, timing: Sequence[_CudaTimes], stats: BroadcastStats, *, trail: bool
) -> None:
    """Stage totals and the per-bucket timeline from the (completed) events of one pass."""

    def at(ev: torch.cuda.Event | None) -> float:
        return round(origin.elapsed_time(ev), 3) if ev is not None else -1.0

    h2d = d2h = bcast = 0.0
    rows: list[list[float]] = []
    for tm in timing:
        row = [
            float(tm.index),
            float(tm.root),
            round(tm.nbytes / (1 << 20), 3),
            at(tm.h2d_start),
            at(tm.h2d_end),
            at(tm.bcast_start),
            at(tm.arrived),
            at(tm.d2h_end),
            round(tm.announced * 1e3, 3) if tm.announced >= 0 else -1.0,
        ]
        rows.append(row)
        if row[3] >= 0:
            h2d += (row[4] - row[3]) / 1e3
        if row[5] >= 0:
            bcast += (row[6] - row[5]) / 1e3
        if row[7] >= 0:
            d2h += (row[7] - row[6]) / 1e3
    span = max((r[6] for r in rows), default=0.0) / 1e3
    if trail:
        stats.trail_host_to_slot_seconds = h2d
        stats.trail_slot_to_host_seconds = d2h
        stats.trail_gpu_span_seconds = max(span, max((r[7] for r in rows), default=0.0) / 1e3)
        stats.trail_timeline = rows
    else:
        stats.host_to_slot_seconds = h2d
        stats.broadcast_seconds = bcast
        stats.slot_to_host_seconds = d2h
        stats.gpu_span_seconds = span
        stats.timeline = rows


def run_broadcast(
    group: Group,
    staged: StagedCheckpoint,
    plan: buckets.BucketPlan,
    layout: buckets.Layout,
    member_parts: Mapping[int, tuple[int, int] | None],
    sender: HandoffSender,
    version: str,
    transport: BroadcastTransport,
    *,
    full_out: Mapping[int, HostBuffer] | None = None,
    progress: Callable[[int], None] | None = None,
    op_timeout: float = 60.0,
    end: bool = True,
    begin: bool = True,
    trail_full: bool = False,
) -> BroadcastStats:
    """One broadcast update on this rank. `member_parts` maps every rank to the part it holds
    ((index, count), or None for a complete copy); see `buckets.owners_by_part`."""
    try:
        owners = buckets.owners_by_part(member_parts, len(plan.parts))
    except ValueError as e:
        raise BroadcastError(str(e)) from e
    try:
        return transport.run(
            group,
            staged,
            plan,
            owners,
            sender,
            version,
            slots=layout.slots,
            full_out=full_out,
            progress=progress,
            op_timeout=op_timeout,
            end=end,
            begin=begin,
            trail_full=trail_full,
        )
    except GroupError as e:
        raise BroadcastError(str(e)) from e
