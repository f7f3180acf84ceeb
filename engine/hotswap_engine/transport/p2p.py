"""Peer-to-peer catch-up over the Mooncake transfer engine: one-sided reads of peers' staged host
buffers into a new pod's buffer. Holders only register memory; they do no work per read.

Holder side: `P2PEndpoint.publish(version, buffers, layout)` registers the version's host buffers
and a small JSON copy of its tensor table, and returns a `PeerSource`: everything a reader needs
(endpoint, remote buffer addresses, where the table is and its sha256). The agent puts that into
its status; the operator passes it on to readers. `withdraw(version)` unregisters before the
buffers are released.

Reader side (the building blocks any source of registered host memory reuses, e.g. a trainer's):
`holders(sources, dest_layout)` contacts every peer at once, reads each one's table through
Mooncake (checked against its digest) and turns it into a planning `Holder`;
`p2p_plan.plan_reads` makes the plan; and `pull(plan, dest, sources)` runs it (`_PullDriver`): one
driver thread keeps `parallel` reads in flight per peer (each read its own single-entry Mooncake
batch, polled without blocking, so one completion or failure is attributed to exactly one read and
one peer), lets an idle peer take queued reads of a busy one, and, when a peer fails (a read
returns an error or makes no progress in time), re-plans that peer's unfinished ranges onto the others
(`p2p_plan.replan`), or raises `NoHolderLeft` when some bytes are held by nobody left.

Why not the blocking batch calls in threads: Mooncake's synchronous calls spin on the status
without sleeping; on a small host several spinning threads starve the transport's own I/O thread
(measured here: three threads reading from three peers were 2.5-4x slower than one). Polling with
short sleeps leaves the CPU to the transfer.

Security: Mooncake's TCP data port has no authentication; it serves (and accepts writes to) every
registered buffer. Only a version's buffers and its table are ever registered here, and the pool's
Mooncake ports must be reachable only from the pool's own pods (a NetworkPolicy).

Addresses are configuration: `local_hostname` is the pod IP (127.0.0.1 in tests), never detected.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hotswap_engine.p2p_plan import (
    Holder,
    NoHolderLeft,
    ReadPlan,
    ReadTask,
    TensorEntry,
    VersionLayout,
    replan,
)

__all__ = [
    "NoHolderLeft",
    "P2PEndpoint",
    "P2PError",
    "PeerSource",
    "PullResult",
    "RemoteBuffer",
    "staged_layout",
]

log = logging.getLogger(__name__)

P2PHANDSHAKE = "P2PHANDSHAKE"
DEFAULT_PARALLEL = 2  # reads in flight per peer: keeps each connection busy between completions
DEFAULT_STALL_TIMEOUT_S = 10.0
DEFAULT_MIN_RATE = 32 << 20  # bytes/s a live peer delivers at the least, on top of the stall timeout
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # first contact with a peer (handshake and its table)
DEFAULT_GRACE_S = 30.0  # how long withdrawn buffers stay alive for reads already under way
_BAD_BATCH_IDS = (0, (1 << 64) - 1)  # Mooncake's "not submitted" answers (0, or -1 as uint64)


class P2PError(RuntimeError):
    """A peer-to-peer transfer could not be set up or finished."""


Buffer = Any  # a contiguous uint8 torch tensor, or a `hostmem.HostBuffer`


def buffer_span(buffer: Buffer) -> tuple[int, int]:
    """(address, size in bytes) of a host buffer: a contiguous 1-byte-element tensor (data_ptr,
    numel) or anything with `data_ptr()` and `nbytes` (a `hostmem.HostBuffer`)."""
    if hasattr(buffer, "numel"):
        if buffer.element_size() != 1 or not buffer.is_contiguous():
            raise ValueError("a p2p buffer must be a contiguous tensor of 1-byte elements (uint8)")
        if getattr(buffer, "is_cuda", False):
            raise ValueError("p2p buffers live in host memory")
        return int(buffer.data_ptr()), int(buffer.numel())
    if hasattr(buffer, "nbytes") and hasattr(buffer, "data_ptr"):
        return int(buffer.data_ptr()), int(buffer.nbytes)
    raise TypeError(f"not a host buffer: {type(buffer).__name__}")


def _keepalive(buffer: Buffer) -> Any:
    """What keeps a buffer's memory mapped: a HostBuffer's tensor view (its `close()` drops its own
    references, and the view still holds the mapping), else the object itself."""
    tensor = getattr(buffer, "tensor", None)
    return tensor if tensor is not None and not callable(tensor) else buffer


def staged_layout(staged: Any) -> VersionLayout:
    """The tensor table of a `staging.StagedCheckpoint` (one segment per part buffer it holds)."""
    tensors = [
        TensorEntry(name, t.spec.dtype, tuple(t.spec.shape), t.offset, t.nbytes, t.segment)
        for name, t in staged.tensors.items()
    ]
    segments = tuple((part, int(buf.nbytes)) for part, buf in sorted(staged.segments.items()))
    return VersionLayout(tuple(sorted(tensors, key=lambda t: (t.segment, t.offset, t.name))), segments)


# ---- what holders publish ------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteBuffer:
    """One registered buffer of a holder: buffer id `segment` of its layout, at `address`."""

    segment: int
    address: int
    nbytes: int


@dataclass(frozen=True)
class PeerSource:
    """What a holder publishes per staged version so a reader can fetch it with one-sided reads.

    The tensor table itself is not in here (hundreds of entries for a real model): it sits, as
    canonical JSON, in the holder's registered memory at `layout_address`, and the reader checks
    what it read against `layout_sha256`.
    """

    endpoint: str  # the holder's Mooncake endpoint, host:rpc_port
    version: str
    buffers: tuple[RemoteBuffer, ...]
    layout_address: int
    layout_nbytes: int
    layout_sha256: str

    def buffer(self, segment: int) -> RemoteBuffer:
        for b in self.buffers:
            if b.segment == segment:
                return b
        raise KeyError(f"{self.endpoint} published no buffer {segment} for {self.version}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (what goes into the agent's status / an update request)."""
        return {
            "endpoint": self.endpoint,
            "version": self.version,
            "buffers": [
                {"segment": b.segment, "address": b.address, "nbytes": b.nbytes} for b in self.buffers
            ],
            "layout_address": self.layout_address,
            "layout_nbytes": self.layout_nbytes,
            "layout_sha256": self.layout_sha256,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerSource:
        try:
            return cls(
                endpoint=str(data["endpoint"]),
                version=str(data["version"]),
                buffers=tuple(
                    RemoteBuffer(int(b["segment"]), int(b["address"]), int(b["nbytes"]))
                    for b in data["buffers"]
                ),
                layout_address=int(data["layout_address"]),
                layout_nbytes=int(data["layout_nbytes"]),
                layout_sha256=str(data["layout_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed peer source: {e}") from e


@dataclass
class _Published:
    source: PeerSource
    regions: list[int]  # registered addresses (buffers and the layout blob)
    keep: list[Any]  # objects that keep those regions mapped


@dataclass(frozen=True)
class PullResult:
    bytes: int
    seconds: float
    reads: int
    bytes_by_holder: dict[str, int]
    failed_holders: tuple[str, ...]
    replans: int
    stolen_reads: int
    abandoned_reads: int  # reads given up while still pending: the destination stays quarantined


@dataclass
class _Flight:
    task: ReadTask
    deadline: float


@dataclass
class _PullState:
    queues: dict[str, collections.deque[ReadTask]]
    live: set[str]
    inflight: dict[int, _Flight] = field(default_factory=dict)
    zombies: set[int] = field(default_factory=set)  # abandoned batch ids, still polled to free them
    per_holder: collections.Counter[str] = field(default_factory=collections.Counter)
    done_bytes: int = 0
    done_by_holder: collections.Counter[str] = field(default_factory=collections.Counter)
    reads: int = 0
    failed: list[str] = field(default_factory=list)
    replans: int = 0
    stolen: int = 0
    abandoned: int = 0


class P2PEndpoint:
    """One Mooncake TransferEngine for this process (create one per process and share it).

    `local_hostname` is this pod's address as peers reach it (configuration, never detected);
    `protocol` "tcp" (tests, CI) or "rdma" (production, with `device_name` naming the NICs);
    `metadata` "P2PHANDSHAKE" (peers exchange segment descriptions directly) or a metadata server
    URL such as "etcd://host:2379".
    """

    def __init__(
        self,
        local_hostname: str,
        protocol: Literal["tcp", "rdma"] = "tcp",
        device_name: str = "",
        metadata: str = P2PHANDSHAKE,
    ) -> None:
        if not local_hostname:
            raise ValueError("local_hostname is required: the p2p endpoint never guesses its address")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:  # pragma: no cover - depends on the image
            raise P2PError(f"the Mooncake transfer engine is not importable: {e}") from e
        self._engine = TransferEngine()
        rc = self._engine.initialize(local_hostname, metadata, protocol, device_name)
        if rc != 0:
            raise P2PError(
                f"Mooncake initialize({local_hostname!r}, {metadata!r}, {protocol!r}, {device_name!r}) "
                f"failed: {rc}"
            )
        self.protocol = protocol
        if metadata == P2PHANDSHAKE:
            self.endpoint = f"{local_hostname}:{self._engine.get_rpc_port()}"
        else:  # with a metadata server, peers address this engine by its segment name
            self.endpoint = local_hostname
        self._lock = threading.Lock()
        self._registered: dict[int, tuple[int, Any]] = {}  # address -> (size, keepalive)
        self._published: dict[str, _Published] = {}
        self._graveyard: list[tuple[float, list[Any]]] = []  # (free after, keepalives)
        self._quarantine: list[Any] = []  # destinations a stuck read may still write into

    @property
    def engine(self) -> Any:
        """The underlying `mooncake.engine.TransferEngine` (for benchmarks and diagnostics)."""
        return self._engine

    # ---- registration ----------------------------------------------------------------------------

    def register(self, buffer: Buffer) -> tuple[int, int]:
        """Register a host buffer for remote reads (idempotent); returns (address, size)."""
        addr, size = buffer_span(buffer)
        with self._lock:
            self._purge()
            held = self._registered.get(addr)
            if held is not None:
                if held[0] != size:
                    raise P2PError(f"{addr:#x} is already registered with {held[0]} bytes, not {size}")
                return addr, size
            rc = self._engine.register_memory(addr, size)
            if rc != 0:
                raise P2PError(f"Mooncake register_memory({addr:#x}, {size}) failed: {rc}")
            self._registered[addr] = (size, _keepalive(buffer))
        return addr, size

    def unregister(self, buffer: Buffer, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop serving a buffer. Reads already under way may still touch it, so its memory is kept
        mapped for `grace_s` more seconds even if the caller releases it now."""
        addr, _ = buffer_span(buffer)
        self._unregister([addr], grace_s)

    def _unregister(self, addresses: Iterable[int], grace_s: float) -> None:
        with self._lock:
            keep: list[Any] = []
            for addr in addresses:
                held = self._registered.pop(addr, None)
                if held is None:
                    continue
                rc = self._engine.unregister_memory(addr)
                if rc != 0:
                    log.warning("Mooncake unregister_memory(%#x) returned %s", addr, rc)
                keep.append(held[1])
            if keep:
                self._graveyard.append((time.monotonic() + grace_s, keep))
            self._purge()

    def _purge(self) -> None:
        now = time.monotonic()
        self._graveyard = [(t, k) for t, k in self._graveyard if t > now]

    def _covered(self, addr: int, size: int) -> bool:
        return any(a <= addr and addr + size <= a + s for a, (s, _) in self._registered.items())

    # ---- holder side ----------------------------------------------------------------------------

    def publish(self, version: str, buffers: Mapping[int, Buffer], layout: VersionLayout) -> PeerSource:
        """Serve a staged version: register its buffers (`layout`'s segment id -> buffer) and its
        tensor table, and return what readers need. Publishing a version again replaces it."""
        segments = dict(layout.segments)
        if set(buffers) != set(segments):
            raise ValueError(
                f"buffers {sorted(buffers)} do not match the layout's segments {sorted(segments)}"
            )
        remote: list[RemoteBuffer] = []
        for seg in sorted(buffers):
            addr, size = buffer_span(buffers[seg])
            if size < segments[seg]:
                raise ValueError(f"buffer {seg} holds {size} bytes, its layout needs {segments[seg]}")
            remote.append(RemoteBuffer(seg, addr, size))
        blob = layout.encode()
        blob_buffer = ctypes.create_string_buffer(blob, len(blob))
        blob_addr = ctypes.addressof(blob_buffer)
        if version in self._published:
            self.withdraw(version)
        regions: list[int] = []
        try:
            for seg in sorted(buffers):
                regions.append(self.register(buffers[seg])[0])
            rc = self._engine.register_memory(blob_addr, len(blob))
            if rc != 0:
                raise P2PError(f"Mooncake register_memory of the layout table failed: {rc}")
            with self._lock:
                self._registered[blob_addr] = (len(blob), blob_buffer)
            regions.append(blob_addr)
        except BaseException:
            self._unregister(regions, 0.0)
            raise
        source = PeerSource(
            endpoint=self.endpoint,
            version=version,
            buffers=tuple(remote),
            layout_address=blob_addr,
            layout_nbytes=len(blob),
            layout_sha256=hashlib.sha256(blob).hexdigest(),
        )
        with self._lock:
            self._published[version] = _Published(source, regions, [blob_buffer])
        return source

    def withdraw(self, version: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop serving a version (call before releasing its buffers)."""
        with self._lock:
            entry = self._published.pop(version, None)
        if entry is not None:
            self._unregister(entry.regions, grace_s)

    # ---- reader side ----------------------------------------------------------------------------

    def fetch_layout(self, source: PeerSource, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> VersionLayout:
        """Read a peer's tensor table (one small one-sided read) and check it against its digest.

        This is also the first contact with the peer (Mooncake's handshake), which blocks for a
        minute on a peer that accepts connections but does not answer (a frozen process), so the
        read runs on a helper thread and gives up after `timeout_s`.
        """
        if not 0 < source.layout_nbytes <= 64 << 20:
            raise P2PError(f"{source.endpoint}: implausible layout size {source.layout_nbytes}")
        scratch = ctypes.create_string_buffer(source.layout_nbytes)
        addr = ctypes.addressof(scratch)
        engine = self._engine
        rc = engine.register_memory(addr, source.layout_nbytes)
        if rc != 0:
            raise P2PError(f"Mooncake register_memory for a layout read failed: {rc}")
        result: dict[str, int] = {}

        def read(keep: Any = scratch) -> None:  # `keep` holds the scratch buffer while the read runs
            try:
                result["rc"] = engine.transfer_sync_read(
                    source.endpoint, addr, source.layout_address, source.layout_nbytes
                )
            finally:
                engine.unregister_memory(addr)

        thread = threading.Thread(target=read, name=f"p2p-layout-{source.endpoint}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise P2PError(f"{source.endpoint} did not answer within {timeout_s:.0f}s")
        if result.get("rc") != 0:
            raise P2PError(
                f"reading the layout of {source.version} from {source.endpoint} failed ({result.get('rc')})"
            )
        blob = scratch.raw
        if hashlib.sha256(blob).hexdigest() != source.layout_sha256:
            raise P2PError(f"the layout read from {source.endpoint} does not match its published sha256")
        try:
            return VersionLayout.from_json(json.loads(blob))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise P2PError(f"the layout read from {source.endpoint} is not JSON: {e}") from e

    def holder(
        self,
        name: str,
        source: PeerSource,
        dest: VersionLayout,
        held: VersionLayout | None = None,
        timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> Holder:
        """A planning holder for `source` (its table fetched unless given as `held`)."""
        layout = held if held is not None else self.fetch_layout(source, timeout_s)
        for seg, size in layout.segments:
            if source.buffer(seg).nbytes < size:
                raise P2PError(f"{source.endpoint}: buffer {seg} is smaller than its layout says")
        return Holder.from_layouts(name, dest, layout)

    def holders(
        self,
        sources: Mapping[str, PeerSource],
        dest: VersionLayout,
        timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> tuple[list[Holder], dict[str, str]]:
        """Contact every peer at once: the holders that answered within `timeout_s` (in the order of
        `sources`), and why each other one was left out. Plan with the former; `plan_reads` raises
        `NoHolderLeft` if they do not cover the version.

        Each peer is first probed (`send_probe`), which does not take the engine's segment lock: a
        first contact through the transfer path does, and with a peer that accepts connections but
        never answers (a frozen process) it would stall every transfer of this engine for about a
        minute. Only peers that answered the probe are then asked for their tables. Contacting them
        all here also keeps the first-contact handshake out of `pull()`.
        """
        lock = threading.Lock()
        found: dict[str, Holder] = {}
        errors: dict[str, str] = {}
        probe = getattr(self._engine, "send_probe", None)  # absent from older Mooncake builds

        def contact(name: str, source: PeerSource) -> None:
            try:
                if probe is not None and (rc := probe(source.endpoint)) != 0:
                    raise P2PError(f"{source.endpoint} did not answer the probe ({rc})")
                holder = self.holder(name, source, dest, timeout_s=timeout_s)
            except (P2PError, ValueError, KeyError) as e:
                with lock:
                    errors.setdefault(name, str(e))
                return
            with lock:
                if name not in errors:  # not already given up on
                    found[name] = holder

        threads = {
            name: threading.Thread(target=contact, args=(name, src), name=f"p2p-contact-{name}", daemon=True)
            for name, src in sources.items()
        }
        for t in threads.values():
            t.start()
        deadline = time.monotonic() + timeout_s
        for name, t in threads.items():
            t.join(max(0.0, deadline - time.monotonic()))
            with lock:
                if t.is_alive() and name not in found:
                    errors.setdefault(
                        name, f"{sources[name].endpoint} did not answer within {timeout_s:.0f}s"
                    )
        with lock:
            return [found[n] for n in sources if n in found and n not in errors], dict(errors)

    def pull(
        self,
        plan: ReadPlan,
        dest: Buffer,
        sources: Mapping[str, PeerSource],
        *,
        progress: Callable[[int, int], None] | None = None,
        on_range: Callable[[int, int], None] | None = None,
        parallel: int = DEFAULT_PARALLEL,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        min_rate: float = DEFAULT_MIN_RATE,
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
        poll_interval_s: float = 0.0005,
        steal: bool = True,
    ) -> PullResult:
        """Read every task of `plan` into `dest` (laid out as `plan.layout`) from the holders named
        in `sources`, resuming a failed holder's ranges on the others.

        `progress(done, total)` and `on_range(start, length)` run on this thread after each read
        lands (`on_range` lets a caller start the host→GPU copy of a range at once). A read counts
        as failed when Mooncake reports an error, or when it has not finished within
        `stall_timeout_s + length * parallel / min_rate` seconds. Raises `NoHolderLeft` when no
        holder is left for some range, `P2PError` on timeout/cancel; before raising it waits for
        the reads still in flight, so the caller may reuse `dest` (except after reads that had to
        be abandoned as stuck: those keep `dest` quarantined, alive, for this endpoint's lifetime).
        """
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        dest_addr, dest_size = buffer_span(dest)
        if dest_size < plan.layout.total_bytes:
            raise ValueError(
                f"destination holds {dest_size} bytes, the layout needs {plan.layout.total_bytes}"
            )
        missing = [h.name for h in plan.holders if h.name not in sources]
        if missing:
            raise ValueError(f"no peer source for holders {missing}")
        with self._lock:
            covered = self._covered(dest_addr, dest_size)
        if not covered:  # RDMA needs the local side registered too; TCP does not mind
            self.register(dest)
        driver = _PullDriver(
            self._engine,
            plan,
            dest_addr,
            sources,
            _PullOptions(parallel, stall_timeout_s, min_rate, poll_interval_s, steal),
            progress=progress,
            on_range=on_range,
        )
        try:
            driver.run(timeout_s, cancel)
        except BaseException:
            driver.drain()
            raise
        finally:
            driver.poll_zombies()
            if driver.state.zombies:
                driver.state.abandoned = len(driver.state.zombies)
                with self._lock:
                    self._quarantine.append(_keepalive(dest))
            elif not covered:
                self.unregister(dest, grace_s=0.0)
        return driver.result()

    def close(self) -> None:
        """Unregister everything. The engine itself goes with the last reference to this object."""
        with self._lock:
            addresses = list(self._registered)
            self._published.clear()
        self._unregister(addresses, 0.0)
        with self._lock:
            self._graveyard.clear()

    def __enter__(self) -> P2PEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the reader's driver -------------------------------------------------------------------------


@dataclass(frozen=True)
class _PullOptions:
    parallel: int  # reads in flight per holder
    stall_timeout_s: float
    min_rate: float
    poll_interval_s: float
    steal: bool  # an idle holder takes queued reads of a busy one


# Mooncake's `transfer_check_status` answers.
_PENDING, _COMPLETED, _FAILED = 0, 1, -1


class _PullDriver:
    """One `P2PEndpoint.pull`: keeps each live holder's window of reads full, collects finished
    reads, and moves a failed holder's ranges to the others. Runs on the caller's thread."""

    def __init__(
        self,
        engine: Any,
        plan: ReadPlan,
        dest_addr: int,
        sources: Mapping[str, PeerSource],
        options: _PullOptions,
        *,
        progress: Callable[[int, int], None] | None,
        on_range: Callable[[int, int], None] | None,
    ) -> None:
        self.engine = engine
        self.plan = plan  # the current plan: replaced by each replan
        self.dest_addr = dest_addr
        self.sources = sources
        self.options = options
        self.progress = progress
        self.on_range = on_range
        self.holders = {h.name: h for h in plan.holders}
        self.total = plan.total_bytes
        self.started = time.monotonic()
        self.state = _PullState(
            queues={h.name: collections.deque() for h in plan.holders},
            live={h.name for h in plan.holders},
        )
        self._enqueue(plan.tasks)

    def run(self, timeout_s: float | None, cancel: threading.Event | None) -> None:
        """Until every range landed; `NoHolderLeft` or `P2PError` otherwise (reads may be in flight)."""
        while True:
            self._check_still_wanted(timeout_s, cancel)
            self._fill_windows()
            if not self.state.inflight:
                if any(self.state.queues[n] for n in self.state.live):
                    continue  # a replan just queued work
                return
            progressed = self._collect()
            if self.state.zombies:
                self.poll_zombies()
            if not progressed:
                time.sleep(self.options.poll_interval_s)

    def result(self) -> PullResult:
        s = self.state
        return PullResult(
            bytes=s.done_bytes,
            seconds=time.monotonic() - self.started,
            reads=s.reads,
            bytes_by_holder=dict(s.done_by_holder),
            failed_holders=tuple(s.failed),
            replans=s.replans,
            stolen_reads=s.stolen,
            abandoned_reads=s.abandoned,
        )

    # ---- one sweep ------------------------------------------------------------------------------

    def _check_still_wanted(self, timeout_s: float | None, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise P2PError("p2p pull cancelled")
        if timeout_s is not None and time.monotonic() - self.started > timeout_s:
            raise P2PError(
                f"p2p pull timed out after {timeout_s:.1f}s ({self.state.done_bytes}/{self.total} bytes)"
            )

    def _fill_windows(self) -> None:
        """Submit reads until every live holder has `parallel` in flight (or nothing left to read)."""
        state = self.state
        for name in sorted(state.live):
            while name in state.live and state.per_holder[name] < self.options.parallel:
                queue = state.queues[name]
                if not queue and not (self.options.steal and self._steal_for(name)):
                    break
                task = queue.popleft()
                if not self._submit(task):
                    self._fail_holder(name, "Mooncake refused the read (peer unreachable?)", [task])

    def _submit(self, task: ReadTask) -> bool:
        src = self.sources[task.holder]
        buf = src.buffer(task.buffer)
        if task.offset + task.length > buf.nbytes:
            raise P2PError(f"{task.holder}: read past the end of its buffer {task.buffer}")
        bid = self.engine.batch_transfer_async_read(
            src.endpoint, [self.dest_addr + task.start], [buf.address + task.offset], [task.length]
        )
        if bid in _BAD_BATCH_IDS or bid < 0:
            return False
        opts = self.options
        deadline = time.monotonic() + opts.stall_timeout_s + task.length * opts.parallel / opts.min_rate
        self.state.inflight[bid] = _Flight(task, deadline)
        self.state.per_holder[task.holder] += 1
        return True

    def _collect(self) -> bool:
        """Settle every read that finished or ran past its deadline; whether any did."""
        state = self.state
        progressed = False
        now = time.monotonic()
        for bid, flight in list(state.inflight.items()):
            if bid not in state.inflight:
                continue  # dropped by a _fail_holder() earlier in this sweep
            status = self.engine.transfer_check_status(bid)
            if status == _PENDING and now <= flight.deadline:
                continue
            progressed = True
            del state.inflight[bid]
            state.per_holder[flight.task.holder] -= 1
            if status == _COMPLETED:
                self._landed(flight.task)
            elif status == _PENDING:
                state.zombies.add(bid)
                self._fail_holder(
                    flight.task.holder,
                    f"read of {flight.task.length} bytes made no progress in time",
                    [flight.task],
                )
            else:
                if status != _FAILED:  # a timeout status: the batch may still be live
                    state.zombies.add(bid)
                self._fail_holder(
                    flight.task.holder, f"read failed (Mooncake status {status})", [flight.task]
                )
        return progressed

    def _landed(self, task: ReadTask) -> None:
        state = self.state
        state.done_bytes += task.length
        state.done_by_holder[task.holder] += task.length
        state.reads += 1
        if self.on_range is not None:
            self.on_range(task.start, task.length)
        if self.progress is not None:
            self.progress(state.done_bytes, self.total)

    # ---- failures and balancing -------------------------------------------------------------------

    def _enqueue(self, tasks: Iterable[ReadTask]) -> None:
        for t in tasks:
            self.state.queues[t.holder].append(t)

    def _fail_holder(self, name: str, why: str, pending: list[ReadTask]) -> None:
        """Give up on `name`: its queued and in-flight ranges are planned onto the holders left
        (`replan` raises `NoHolderLeft` when nobody holds some of them)."""
        state = self.state
        log.warning("p2p: giving up on holder %s: %s", name, why)
        state.live.discard(name)
        state.failed.append(name)
        remaining = [t.range for t in pending] + [t.range for t in state.queues.pop(name, ())]
        for bid, flight in list(state.inflight.items()):
            if flight.task.holder == name:
                del state.inflight[bid]
                state.per_holder[name] -= 1
                remaining.append(flight.task.range)
                state.zombies.add(bid)
        if not remaining:
            return
        # replan() may raise NoHolderLeft; `pull` drains the reads in flight first.
        self.plan = replan(self.plan, remaining, state.failed)
        state.replans += 1
        self._enqueue(self.plan.tasks)

    def _steal_for(self, name: str) -> bool:
        """Move one queued read of the busiest other holder to idle `name`, if it holds those bytes."""
        state = self.state
        victims = sorted(
            (n for n in state.live if n != name and state.queues.get(n)),
            key=lambda n: (-sum(t.length for t in state.queues[n]), n),
        )
        for victim in victims:
            queue = state.queues[victim]
            if len(queue) == 0:
                continue
            task = queue[-1]
            pieces = self.holders[name].locate(task.start, task.length)
            if pieces is not None:
                queue.pop()
                state.queues[name].extend(pieces)
                state.stolen += 1
                return True
        return False

    # ---- reads still writing into the destination ---------------------------------------------------

    def poll_zombies(self) -> None:
        """Forget abandoned reads that finished (Mooncake frees a batch only once it finished)."""
        for bid in list(self.state.zombies):
            if self.engine.transfer_check_status(bid) in (_COMPLETED, _FAILED):
                self.state.zombies.discard(bid)

    def drain(self) -> None:
        """Wait for reads still writing into the destination; abandon those past their deadline."""
        state = self.state
        while state.inflight:
            now = time.monotonic()
            for bid, flight in list(state.inflight.items()):
                status = self.engine.transfer_check_status(bid)
                if status != _PENDING or now > flight.deadline:
                    del state.inflight[bid]
                    if status not in (_COMPLETED, _FAILED):  # not finished (Mooncake frees only those)
                        state.zombies.add(bid)
            if state.inflight:
                time.sleep(self.options.poll_interval_s)
