"""Contiguous host byte buffers for staged checkpoints: page-locked on CUDA hosts, shared anonymous
memory elsewhere.

Page-locked (pinned) memory is what lets a host→device copy run asynchronously at the link's full
rate; pageable memory measured about a third of that on H200. On a CPU host the buffer is an
anonymous shared mapping: page-aligned, never swapped to a file, and registrable with Mooncake for
peer-to-peer reads. Either way the buffer is exposed both as a flat uint8 tensor (for copies) and a
writable memoryview (so files can be read straight into it with `preadv`, no intermediate copy).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process
HUGEPAGE_MIN_BYTES = 64 << 20  # smaller buffers keep 4 KiB pages


def _new_memfd(size: int) -> int:
    fd = os.memfd_create("hotswap-host", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def cuda_usable() -> bool:
    return torch.cuda.is_available()


class HostBuffer:
    """`nbytes` of host memory; `pinned=None` pins exactly when CUDA is usable.

    Pinned buffers are an anonymous mapping registered with `cudaHostRegister`, not torch's
    pinned allocator: that one rounds sizes up to a power of two (an 8.2 GB part would pin 16 GiB)
    and caches the blocks after they are freed.
    """

    def __init__(
        self,
        nbytes: int,
        pinned: bool | None = None,
        *,
        defer_pin: bool = False,
        capacity: int = 0,
        fd: int | None = None,
    ) -> None:
        if nbytes < 0:
            raise ValueError(f"buffer size must not be negative, got {nbytes}")
        self.nbytes = nbytes
        self.pinned = cuda_usable() if pinned is None else pinned
        size = max(nbytes, capacity, 1)  # zero-sized mappings are not allowed
        self.capacity = size
        self._pool: HostBufferPool | None = None
        self._idle = False  # given back to its pool: a second close() must not free it
        self._freed = False
        # A memfd rather than an anonymous mapping: the same shared memory, but another process (the
        # agent's rank workers) can map it through the fd (`share_fd`, `HostBuffer.from_fd`).
        self._fd = _new_memfd(size) if fd is None else fd
        self._mmap: mmap.mmap | None = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
        if size >= HUGEPAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
            # Huge pages where the host's shmem THP setting allows them ("advise" or better):
            # faulting 2 MiB at a time makes the first read into the buffer and its page-locking
            # several times faster. Elsewhere a no-op (or refused: 4 KiB pages then).
            with contextlib.suppress(OSError):
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self._view = memoryview(self._mmap)
        self._tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._registered = False
        self._lock = threading.Lock()
        if self.pinned and not defer_pin:
            self.pin()

    def pin(self) -> None:
        """Page-lock the buffer (no-op unless `pinned`). Staging calls this after filling it: the
        reads then fault the pages in from several threads, and registering populated pages is
        much cheaper than registering empty ones."""
        if not self.pinned or self._registered:
            return
        size = self.capacity
        err = torch.cuda.cudart().cudaHostRegister(
            self._tensor.data_ptr(), size, _CUDA_HOST_REGISTER_PORTABLE
        )
        if int(err) != 0:
            raise MemoryError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}")
        self._registered = True

    def prefault(self, threads: int = 16) -> None:
        """Allocate and map every page now, from `threads` threads at once (MADV_POPULATE_WRITE,
        Linux 5.14+; elsewhere `populate`). Reads into the buffer then copy into mapped pages only,
        instead of taking a page fault every 4 KiB."""
        if self._mmap is None:
            return
        size = self.capacity
        step = -(-size // max(1, threads))
        step = -(-step // mmap.PAGESIZE) * mmap.PAGESIZE
        base = self.data_ptr()
        libc = ctypes.CDLL(None, use_errno=True)  # ctypes drops the GIL: the threads run in parallel

        def one(start: int) -> int:
            return int(
                libc.madvise(ctypes.c_void_p(base + start), ctypes.c_size_t(min(step, size - start)), 23)
            )

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="prefault") as pool:
            failed = any(rc != 0 for rc in pool.map(one, range(0, size, step)))
        if failed:  # MADV_POPULATE_WRITE unknown to this kernel
            self.populate()

    def populate(self) -> None:
        """Touch every page (torch's fill runs on all intra-op threads), so a later `pin` only
        locks pages instead of also faulting them in one by one."""
        self._tensor.fill_(0)

    @property
    def is_pinned(self) -> bool:
        return self._registered

    @property
    def tensor(self) -> torch.Tensor:
        """The whole buffer as a flat uint8 tensor (length `nbytes`)."""
        return self._tensor[: self.nbytes]

    @property
    def view(self) -> memoryview:
        """A writable byte view of the whole buffer (length `nbytes`)."""
        return self._view[: self.nbytes]

    @classmethod
    def from_fd(cls, fd: int, nbytes: int, capacity: int, pinned: bool = False) -> HostBuffer:
        """Map another process's buffer (its `share_fd`, received over a unix socket); takes
        ownership of `fd`. Pinned here means registered for this process's CUDA contexts."""
        return cls(nbytes, pinned, capacity=capacity, fd=fd)

    def share_fd(self) -> int:
        """The memfd behind the buffer, for passing to another process (SCM_RIGHTS); still owned here."""
        if self._fd < 0:
            raise ValueError("the buffer is freed")
        return self._fd

    @property
    def freed(self) -> bool:
        """The memory is gone from this process (an idle buffer in its pool is not freed)."""
        return self._freed

    def data_ptr(self) -> int:
        return int(self._tensor.data_ptr())

    def resize(self, nbytes: int) -> None:
        """Use the first `nbytes` of the buffer's capacity (`tensor` and `view` follow)."""
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"{nbytes} bytes do not fit a buffer of {self.capacity}")
        self.nbytes = nbytes

    def close(self) -> None:
        """Give the buffer back to its pool, if it came from one; else unpin and drop the
        references (the mapping goes once no tensor view of it is alive)."""
        if self._idle or self._freed:
            return  # closing twice (two versions sharing a segment) is harmless
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self)
            return
        self._free()

    def _free(self) -> None:
        with self._lock:
            self._freed = True
            if self._registered:
                torch.cuda.cudart().cudaHostUnregister(self._tensor.data_ptr())
                self._registered = False
            with contextlib.suppress(BufferError):  # a caller's slice still alive: GC frees it
                self._view.release()
            self._tensor = torch.empty(0, dtype=torch.uint8)
            self._mmap = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class HostBufferPool:
    """Released buffers kept for the next version: pinning is most of a cold staging's time
    (8.2 GB: 0.4–3.4 s on H200, against 0.3 s to read it from page cache into pinned memory), and
    consecutive versions of one model have parts of the same sizes.

    `acquire` returns an idle buffer whose capacity is within `slack` of the request (best fit),
    else a new one; `HostBuffer.close()` on a pooled buffer returns it here. At most
    `max_idle_bytes` stay idle (oldest freed first). Thread-safe.
    """

    def __init__(
        self, pinned: bool | None = None, *, max_idle_bytes: int = 64 << 30, slack: float = 1.25
    ) -> None:
        self.pinned = cuda_usable() if pinned is None else pinned
        self.max_idle_bytes = max_idle_bytes
        self.slack = slack
        self._idle: list[HostBuffer] = []
        self._lock = threading.Lock()
        self.reused = 0  # how many acquisitions an idle buffer served (for metrics and tests)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.capacity for b in self._idle)

    def acquire(self, nbytes: int, *, defer_pin: bool = False) -> HostBuffer:
        with self._lock:
            fits = [b for b in self._idle if nbytes <= b.capacity <= max(nbytes * self.slack, nbytes + 4096)]
            if fits:
                buffer = min(fits, key=lambda b: b.capacity)
                self._idle.remove(buffer)
                self.reused += 1
                buffer._idle = False
                buffer.resize(nbytes)
                buffer._pool = self
                return buffer
        buffer = HostBuffer(nbytes, self.pinned, defer_pin=defer_pin)
        buffer._pool = self
        return buffer

    def _give_back(self, buffer: HostBuffer) -> None:
        with self._lock:
            buffer._idle = True
            self._idle.append(buffer)
            excess = sum(b.capacity for b in self._idle) - self.max_idle_bytes
            dropped = []
            while excess > 0 and self._idle:
                oldest = self._idle.pop(0)
                excess -= oldest.capacity
                dropped.append(oldest)
        for b in dropped:
            b._free()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for b in idle:
            b._free()
