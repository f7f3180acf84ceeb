"""A torch.distributed process group for one broadcast membership, made and destroyed explicitly.

torch allows one *default* group per process and cannot re-initialise it after a member died, so
the default group is never used: the store (`TCPStore` at the master's address) and the backend
(`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU) are built directly, held by a `Group`, and
thrown away with `abort()`. `GroupCache` keeps one across updates while the membership (ranks,
pods, master address and port, backend, device) is unchanged, and drops it after any failure.

Bounded failure: every collective carries an explicit timeout; gloo fails at once when a peer's
connection closes; on NCCL the pipeline polls CUDA events with its own deadline (the op timeout),
raises, and the rank worker process exits (see `Group.abort`), so a dead peer never leaves a
process hanging in a kernel. TORCH_NCCL_ASYNC_ERROR_HANDLING=2 keeps NCCL's watchdog from killing
the process on its own before the error is reported.

Rendezvous: the master's address and port outlive a membership (the operator reuses its base port
for the first attempt of every rollout, and a pod's catch-up group sits on the same port at its own
address), so a member can reach the master's port while the master still holds its *previous*
group's store: the master drops it only when its own `group` call arrives. A plain TCPStore client
would register there and wait in a dead rendezvous while the new store waits for it until the
timeout. So the master names its membership in its store (`MEMBERSHIP_KEY`, a digest of the
spec), a member reconnects until the store it reached names *its* membership, every key of the
group lives under that digest, and the master waits for each member's arrival key itself, so a
member that does not come is reported as such (which rank, which pod, after how long).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ABORT_KEY = "hotswap/abort"
# Set by the master in its store: the digest of the membership the store serves (see the module doc).
MEMBERSHIP_KEY = "hotswap/membership"
# How long a member waits for a store it reached to name its membership before it reconnects
# (the master names it right after binding, so only a store of no group of ours stays silent).
PROBE_S = 2.0
_POLL_S = 0.02
# Failed NCCL backends (and their stores), kept alive until the process exits; see Group.abort.
_ABANDONED: list[Any] = []


class GroupError(RuntimeError):
    """The group could not be formed, or a collective failed; the group is unusable."""


@dataclass(frozen=True)
class GroupSpec:
    """Who is in the group: pod names by rank, the master (rank 0 hosts the store there)."""

    members: tuple[str, ...]
    master_addr: str
    master_port: int
    backend: str = "gloo"  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a group needs at least one member")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown backend {self.backend!r}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"members must be distinct, got {self.members}")

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def token(self) -> str:
        """A digest of the membership: equal on every member of this group, different for any other
        (other pods, order, master, port or backend)."""
        raw = json.dumps([list(self.members), self.master_addr, self.master_port, self.backend])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def joined_key(self, rank: int) -> str:
        return f"hotswap/{self.token}/joined/{rank}"


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bind the store's port on exactly the master's address (TCPStore alone binds every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _membership(store: dist.TCPStore, wait: float) -> str | None:
    """The membership a store names, waiting up to `wait` seconds for it; None: it names none (or
    went away)."""
    deadline = time.monotonic() + wait
    try:
        while not store.check([MEMBERSHIP_KEY]):
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)
        return bytes(store.get(MEMBERSHIP_KEY)).decode(errors="replace")
    except (RuntimeError, ValueError):  # the store's server closed (its group was dropped)
        return None


def _close_if_same_socket(fd: int, sock: socket.socket) -> None:
    """Close `fd` if it is still our duplicate of `sock` (a store that refused it before adopting
    it); if torch closed it, the number may belong to something else by now and is left alone."""
    with contextlib.suppress(OSError):
        mine, theirs = os.fstat(sock.fileno()), os.fstat(fd)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            os.close(fd)


class Group:
    """One live process group. Not thread-safe except `abort()`, which may be called from anywhere."""

    def __init__(
        self,
        spec: GroupSpec,
        rank: int,
        *,
        bind_host: str,
        device: torch.device,
        timeout: float,
    ) -> None:
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {rank} is outside a group of {spec.world_size}")
        if (spec.backend == "nccl") != (device.type == "cuda"):
            raise ValueError(f"backend {spec.backend} does not drive a {device.type} device")
        self.spec = spec
        self.rank = rank
        self.device = device
        self.timeout = timeout
        self.broken = False
        self.needs_exit = False  # a failed NCCL group: the process must exit before using the GPU again
        self._lock = threading.Lock()
        self._listen: socket.socket | None = None
        delta = timedelta(seconds=timeout)
        self.store: dist.TCPStore | None = None
        try:
            self.store = self._rendezvous(delta)
            # Under the membership's digest: nothing of another group's rendezvous can be read here.
            prefixed = dist.PrefixStore(f"hotswap/{spec.token}/{spec.backend}", self.store)
            # The backends' Python stubs are incomplete (no _Options, no eager connect): typed loosely.
            self.backend: Any
            if spec.backend == "gloo":
                opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
                opts._timeout = delta
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
                self.backend = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, opts)
            else:
                # Abort the communicator on a timed-out collective instead of killing the process.
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
                nccl_opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
                nccl_opts._timeout = delta
                self.backend = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, nccl_opts)
                self.backend.eager_connect_single_device(device)
            self._warm_up()
        except Exception as e:
            self.abort()
            # The error's frames would keep the store (and its listening port) alive as long as
            # the error is kept: drop their locals, so the next attempt can bind the port.
            traceback.clear_frames(e.__traceback__)
            raise GroupError(f"could not form the {spec.backend} group as rank {rank}: {e}") from e

    def _rendezvous(self, delta: timedelta) -> dist.TCPStore:
        """Reach this membership's store (also `self.store` at once, for `abort`); the master
        returns once every member came."""
        spec = self.spec
        deadline = time.monotonic() + delta.total_seconds()
        if self.rank == 0:
            store = self.store = self._master_store(delta)
            store.set(MEMBERSHIP_KEY, spec.token)
            self._await_members(store, deadline)
        else:
            store = self.store = self._member_store(delta, deadline)
            store.set(spec.joined_key(self.rank), "1")
        return store

    def _master_store(self, delta: timedelta) -> dist.TCPStore:
        """The store on exactly `master_addr:master_port`, on a socket bound here when torch adopts
        one. Built without waiting for workers, so any error here is the store's own, never a
        member that is late: only such an error falls back to letting torch bind the port."""
        spec = self.spec
        sock = self._listen = _listen_socket(spec.master_addr, spec.master_port)
        # torch owns (and closes) the descriptor it adopts, also when the store fails: it gets a
        # duplicate, the socket object here keeps its own (closed by `abort`).
        fd = os.dup(sock.fileno())

        def store(listen_fd: int | None = None) -> dist.TCPStore:
            return dist.TCPStore(
                spec.master_addr,
                spec.master_port,
                spec.world_size,
                is_master=True,
                timeout=delta,
                wait_for_workers=False,
                master_listen_fd=listen_fd,
            )

        try:
            return store(fd)
        except (TypeError, RuntimeError, ValueError) as e:
            refused = e
        _close_if_same_socket(fd, sock)
        log.warning(
            "TCPStore could not adopt the socket bound on %s:%d (%s); binding by port",
            spec.master_addr,
            spec.master_port,
            refused,
        )
        sock.close()
        self._listen = None
        try:
            return store()
        except (RuntimeError, ValueError) as e:
            raise GroupError(
                f"cannot host the store on {spec.master_addr}:{spec.master_port}: {e} "
                f"(adopting a bound socket failed first: {refused})"
            ) from e

    def _await_members(self, store: dist.TCPStore, deadline: float) -> None:
        spec = self.spec
        keys = [spec.joined_key(r) for r in range(1, spec.world_size)]
        while keys and not store.check(keys):
            if time.monotonic() >= deadline:
                missing = [r for r in range(1, spec.world_size) if not store.check([spec.joined_key(r)])]
                raise GroupError(
                    f"rank(s) {missing} ({', '.join(spec.members[r] for r in missing)}) did not reach "
                    f"the store on {spec.master_addr}:{spec.master_port} within {self.timeout:.0f}s"
                )
            time.sleep(_POLL_S)

    def _member_store(self, delta: timedelta, deadline: float) -> dist.TCPStore:
        """A client of the store that names this membership; a store of another one (the master's
        previous group, still up until the master's own `group` call drops it) is left at once."""
        spec = self.spec
        where = f"{spec.master_addr}:{spec.master_port}"
        seen: str | None = None
        failed: Exception | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                found = f"only a store of another membership ({seen})" if seen else "no store of this group"
                last = f" (last: {failed})" if failed is not None else ""
                raise GroupError(f"{found} answered on {where} within {self.timeout:.0f}s{last}")
            try:
                store = dist.TCPStore(
                    spec.master_addr,
                    spec.master_port,
                    spec.world_size,
                    is_master=False,
                    timeout=timedelta(seconds=remaining),
                    wait_for_workers=False,
                )
            except (RuntimeError, ValueError) as e:
                # Nothing listened there in time, or the store it reached closed under it (the
                # master dropping its previous group): again, until the deadline.
                failed = e
                time.sleep(_POLL_S)
                continue
            named = _membership(store, min(PROBE_S, max(remaining, _POLL_S)))
            if named == spec.token:
                store.set_timeout(delta)
                return store
            if named is not None and named != seen:
                log.info("the store on %s serves another membership (%s); waiting for ours", where, named)
            seen = named or seen
            del store
            time.sleep(_POLL_S)

    def _warm_up(self) -> None:
        """One tiny broadcast, so connection set-up is paid here and not by the first bucket."""
        self.barrier()

    def barrier(self) -> None:
        """All members reach this point (a one-byte broadcast, waited for on the host)."""
        probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
        self.broadcast(probe, 0).wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def broadcast(self, tensor: torch.Tensor, root: int) -> dist.Work:
        """Start broadcasting `tensor` from `root` (in place on every member); returns the work."""
        if self.broken:
            raise GroupError("the group is broken")
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        opts.timeout = timedelta(seconds=self.timeout)
        return self.backend.broadcast([tensor], opts)

    def signal_abort(self, reason: str) -> None:
        """Tell the other members (through the store) that this update is over; best effort."""
        # The store may be gone with its master: then there is nothing left to tell.
        with contextlib.suppress(Exception):
            if self.store is not None:
                self.store.set(ABORT_KEY, reason[:1000])

    def abort_requested(self) -> str | None:
        store = self.store
        if store is None:
            return "the group was torn down"
        try:
            if store.check([ABORT_KEY]):
                return bytes(store.get(ABORT_KEY)).decode(errors="replace")
        except Exception as e:  # the store's master is gone: the group is dead
            return f"the group's store is unreachable ({e})"
        return None

    def abort(self) -> None:
        """Tear the group down now: pending collectives fail, connections close. Idempotent.

        gloo: the backend's abort closes its connections, so every peer fails at once. NCCL: the
        communicator is *not* aborted in-process. On 2×H200, after a peer died inside a broadcast,
        the surviving process hung for good once the abort path ran (the binding holds the GIL
        while NCCL waits on the stuck kernel). So the backend is only abandoned (kept referenced, so
        no destructor runs either) and `needs_exit` is set: the rank worker must exit
        (`os._exit`), which frees the GPU context with its stuck kernel, and the agent starts a
        new worker.
        """
        with self._lock:
            self.broken = True
            backend = getattr(self, "backend", None)
            if backend is not None:
                if self.spec.backend == "nccl":
                    _ABANDONED.append(backend)
                    self.needs_exit = True
                else:
                    try:
                        backend.abort()
                    except Exception as e:  # depends on the backend's state
                        log.debug("backend abort failed: %s", e)
                self.backend = None
            if self.store is not None:
                if self.spec.backend == "nccl":
                    _ABANDONED.append(self.store)  # the NCCL backend still refers to it
                self.store = None
            if self._listen is not None:
                self._listen.close()
                self._listen = None


class GroupCache:
    """Keeps the last group while the same membership asks again; anything else rebuilds it."""

    def __init__(self) -> None:
        self._group: Group | None = None
        self._key: tuple[GroupSpec, int, str, torch.device] | None = None
        # Set once a failed NCCL group was abandoned: this process must exit before it uses the
        # GPU again (see Group.abort); the agent's rank worker checks it after a failed update.
        self.needs_exit = False

    def get(
        self, spec: GroupSpec, rank: int, *, bind_host: str, device: torch.device, timeout: float
    ) -> Group:
        key = (spec, rank, bind_host, device)
        group = self._group
        if group is not None and self._key == key and not group.broken:
            group.timeout = timeout
            return group
        self.discard()
        self._group = Group(spec, rank, bind_host=bind_host, device=device, timeout=timeout)
        self._key = key
        return self._group

    @property
    def current(self) -> Group | None:
        return self._group

    def would_abandon(self, spec: GroupSpec, rank: int, *, bind_host: str, device: torch.device) -> bool:
        """True when `get` for this membership would have to drop a healthy NCCL group: the process
        should rather be replaced (a fresh one has no communicator to abandon, and NCCL's teardown
        is not safe to run in-process, see `Group.abort`)."""
        group = self._group
        return (
            group is not None
            and not group.broken
            and group.spec.backend == "nccl"
            and self._key != (spec, rank, bind_host, device)
        )

    def discard(self) -> None:
        if self._group is not None:
            self._group.abort()
            self.needs_exit = self.needs_exit or self._group.needs_exit
            self._group = None
            # A torn-down group's TCPStore (and with it the master's listening port) can stay
            # referenced from reference cycles (the frames of the error that broke the group,
            # its Work objects) until the cyclic GC runs, minutes away in an idle rank worker:
            # the next group on that port then fails with EADDRINUSE and costs an attempt (seen in
            # tests/e2e/test_faults.py after a rank worker was killed mid-transfer). Collect now.
            gc.collect()
        self._key = None
