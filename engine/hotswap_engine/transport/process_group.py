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
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ABORT_KEY = "hotswap/abort"
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
        try:
            self.store = self._make_store(delta)
            # A fresh prefix per group generation would only matter if a store were reused; ours is not.
            prefixed = dist.PrefixStore(f"hotswap/{spec.backend}", self.store)
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
            raise GroupError(f"could not form the {spec.backend} group as rank {rank}: {e}") from e

    def _make_store(self, delta: timedelta) -> dist.TCPStore:
        spec = self.spec
        if self.rank == 0:
            self._listen = _listen_socket(spec.master_addr, spec.master_port)
            try:
                return dist.TCPStore(
                    spec.master_addr,
                    spec.master_port,
                    spec.world_size,
                    is_master=True,
                    timeout=delta,
                    wait_for_workers=True,
                    master_listen_fd=self._listen.fileno(),
                )
            except (RuntimeError, ValueError) as e:
                # A torch whose store cannot adopt a listening socket: let it bind the port itself.
                log.warning("TCPStore refused the bound socket (%s); binding by port", e)
                self._listen.close()
                self._listen = None
        return dist.TCPStore(
            spec.master_addr,
            spec.master_port,
            spec.world_size,
            is_master=self.rank == 0,
            timeout=delta,
            wait_for_workers=True,
        )

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
            self.store.set(ABORT_KEY, reason[:1000])

    def abort_requested(self) -> str | None:
        try:
            if self.store.check([ABORT_KEY]):
                return bytes(self.store.get(ABORT_KEY)).decode(errors="replace")
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
            if getattr(self, "store", None) is not None:
                if self.spec.backend == "nccl":
                    _ABANDONED.append(self.store)  # the NCCL backend still refers to it
                self.store = None  # type: ignore[assignment]
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
        self._key = None
