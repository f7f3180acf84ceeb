"""The agent's rank workers: one process per local GPU (`rank_worker`), spawned, fed and replaced here.

Each worker talks to the agent over its own unix socketpair (msgpack frames, see `ranks`; host
buffers travel as memfds). Calls block, so the runner makes them from threads; one call per worker
at a time (a lock per worker). A worker that dies (killed, or exiting after an abandoned NCCL
group) fails the call it was in with `RankWorkerDied`; `ensure()` starts a new one before the next
operation, so the agent itself never exits because of a collective.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from hotswap_engine.agent import ranks
from hotswap_engine.hostmem import HostBuffer

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # importing torch and opening a CUDA context on a busy node can be slow
EXIT_WAIT_S = 10.0


class RankWorkerDied(RuntimeError):
    """The worker process is gone (or stopped answering and was killed)."""


class _Worker:
    def __init__(self, local_rank: int, argv: list[str], env: dict[str, str] | None) -> None:
        self.local_rank = local_rank
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        try:
            self.proc = subprocess.Popen(
                [*argv, "--fd", str(child.fileno()), "--local-rank", str(local_rank)],
                pass_fds=(child.fileno(),),
                env=env,
            )
        finally:
            child.close()
        self.lock = threading.Lock()
        self.mapped: set[int] = set()
        self.hello: dict[str, Any] | None = None
        self.dead = False

    def wait_hello(self, timeout: float) -> dict[str, Any]:
        with self.lock:
            return self._hello(timeout)

    def _hello(self, timeout: float) -> dict[str, Any]:
        """The worker's first message (its sender is bound); the lock is held."""
        if self.hello is None:
            msg = self._recv(timeout)
            if msg.get("op") != "hello":
                raise ranks.ProtocolError(f"expected hello, got {msg.get('op')}")
            self.hello = msg
        return self.hello

    def call(
        self,
        msg: dict[str, Any],
        *,
        fds: Sequence[int] = (),
        timeout: float,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Send a command and wait for its result; `timeout` bounds the silence between messages."""
        with self.lock:
            if self.dead:
                raise RankWorkerDied(f"rank worker {self.local_rank} is gone")
            self._hello(START_TIMEOUT_S)
            try:
                ranks.send_message(self.sock, msg, fds)
            except OSError as e:
                self._died(f"could not send ({e})")
            while True:
                answer = self._recv(timeout)
                if answer["op"] == "result":
                    if answer.get("exiting"):
                        self._reap(EXIT_WAIT_S)
                    return answer
                if on_event is not None:
                    on_event(answer)

    def _recv(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        try:
            msg, fds = ranks.recv_message(self.sock)
        except TimeoutError:
            self._died(f"no answer in {timeout:.0f}s: killed", kill=True)
        except ranks.ProtocolError as e:  # out of step with us: its answers cannot be trusted
            self._died(f"sent a malformed message ({e}): killed", kill=True)
        except (EOFError, OSError) as e:
            self._died(str(e))
        for fd in fds:  # workers send none
            os.close(fd)
        return msg

    def _died(self, why: str, *, kill: bool = False) -> NoReturn:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = self._reap(EXIT_WAIT_S)
        raise RankWorkerDied(f"rank worker {self.local_rank} (pid {self.proc.pid}) {why}; exit status {code}")

    def _reap(self, timeout: float) -> int | None:
        self.dead = True
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(EXIT_WAIT_S)

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive() and self.lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(Exception):
                    ranks.send_message(self.sock, {"op": "exit"})
            finally:
                self.lock.release()
        try:
            self.proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(EXIT_WAIT_S)
        self.dead = True
        with contextlib.suppress(OSError):
            self.sock.close()


class RankPool:
    """`local` rank workers on `device` ("cpu", or "cuda": worker i on cuda:i)."""

    def __init__(
        self,
        local: int,
        device: str,
        *,
        endpoint: str,
        workers: int,
        bind_host: str,
        shm_dir: str,
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        if local < 1:
            raise ValueError(f"at least one rank worker, got {local}")
        self.local = local
        self.device = device
        self.timeout = timeout
        self.endpoint_template = endpoint
        self._argv = [
            sys.executable,
            "-m",
            "hotswap_engine.agent.rank_worker",
            "--endpoint",
            endpoint,
            "--workers",
            str(workers),
            "--bind-host",
            bind_host,
            "--shm-dir",
            shm_dir,
            "--timeout",
            str(timeout),
        ]
        self._env = env
        self._workers: list[_Worker | None] = [None] * local
        self._ids: weakref.WeakKeyDictionary[HostBuffer, int] = weakref.WeakKeyDictionary()
        self._shared: dict[int, weakref.ref[HostBuffer]] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self.start()

    def _device_of(self, local_rank: int) -> str:
        return f"cuda:{local_rank}" if self.device == "cuda" else "cpu"

    def start(self) -> None:
        """Start every missing or dead worker (does not wait for them)."""
        with self._lock:
            for lr, w in enumerate(self._workers):
                if w is not None and w.alive():
                    continue
                if w is not None:
                    log.warning(
                        "starting a new rank worker %d (the last one exited: %s)", lr, w.proc.returncode
                    )
                    w.stop()
                argv = [*self._argv, "--device", self._device_of(lr)]
                self._workers[lr] = _Worker(lr, argv, self._env)

    def replace(self, local_ranks: Iterable[int]) -> None:
        """Stop these workers (asked to exit, killed if they do not) and start new ones."""
        with self._lock:
            old = [w for lr in local_ranks if (w := self._workers[lr]) is not None]
        for w in old:
            w.stop()
        self.start()

    def ensure(self, timeout: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every worker started and bound (blocking); returns their hellos."""
        self.start()
        return [w.wait_hello(timeout) for w in self._all()]

    def _all(self) -> list[_Worker]:
        with self._lock:
            out = [w for w in self._workers if w is not None]
        assert len(out) == self.local
        return out

    def endpoint(self) -> str:
        """What the vLLM workers connect to: the template with `{rank}`, or the one bound endpoint."""
        if "{rank}" in self.endpoint_template:
            return self.endpoint_template
        (w,) = self._all()
        return str(w.wait_hello(START_TIMEOUT_S)["endpoint"])

    # ---- host buffers ------------------------------------------------------------------------

    def _id(self, buffer: HostBuffer) -> int:
        with self._lock:
            key = self._ids.get(buffer)
            if key is None:
                key = self._ids[buffer] = self._next_id
                self._next_id += 1
                self._shared[key] = weakref.ref(buffer)
            return key

    def buffer_ids(self, buffers: Iterable[HostBuffer]) -> list[int]:
        return [self._id(b) for b in buffers]

    def share(self, buffers: Iterable[HostBuffer], *, wait: bool = True) -> None:
        """Map `buffers` in every worker (pinned there on CUDA), once per buffer and worker. With
        `wait=False`, workers busy with another command are skipped (they map at the next update)."""
        wanted = [(self._id(b), b) for b in buffers]
        self._unmap_closed()
        for w in self._all():
            todo = [(i, b) for i, b in wanted if i not in w.mapped]
            if not todo:
                continue
            if not wait and (w.lock.locked() or w.hello is None):
                continue  # busy, or still starting: it maps them when they are used
            for start in range(0, len(todo), ranks.MAX_FDS):
                batch = todo[start : start + ranks.MAX_FDS]
                msg = {
                    "op": "map",
                    "buffers": [{"id": i, "nbytes": b.capacity, "capacity": b.capacity} for i, b in batch],
                }
                answer = w.call(msg, fds=[b.share_fd() for _, b in batch], timeout=START_TIMEOUT_S)
                if not answer.get("ok"):
                    raise RuntimeError(
                        f"rank worker {w.local_rank} could not map buffers: {answer.get('error')}"
                    )
                w.mapped.update(i for i, _ in batch)

    def _unmap_closed(self) -> None:
        with self._lock:
            # Idle buffers of the agent's HostBufferPool stay mapped (and pinned) for their next use.
            gone = [i for i, ref in self._shared.items() if (b := ref()) is None or b.freed]
            for i in gone:
                del self._shared[i]
        if not gone:
            return
        for w in self._all():
            stale = [i for i in gone if i in w.mapped]
            if stale and w.alive() and not w.lock.locked():
                with contextlib.suppress(Exception):
                    w.call({"op": "unmap", "ids": stale}, timeout=self.timeout)
            w.mapped.difference_update(gone)

    def unmap_closed(self) -> None:
        """Drop workers' mappings of buffers the agent freed (their memory is freed with the last map)."""
        self._unmap_closed()

    # ---- commands ----------------------------------------------------------------------------

    def call_all(
        self,
        make: Callable[[int], dict[str, Any]],
        *,
        timeout: float,
        on_event: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any] | BaseException]:
        """Send `make(local_rank)` to every worker at once; their results (or the exception) by rank."""
        workers = self._all()
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no answer")] * len(workers)

        def one(w: _Worker) -> None:
            try:
                handler = None if on_event is None else (lambda m, lr=w.local_rank: on_event(lr, m))
                results[w.local_rank] = w.call(make(w.local_rank), timeout=timeout, on_event=handler)
            except BaseException as e:  # reported to the caller per worker
                results[w.local_rank] = e

        threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in workers[1:]]
        for t in threads:
            t.start()
        one(workers[0])
        for t in threads:
            t.join()
        return results

    async def acall_all(
        self,
        make: Callable[[int], dict[str, Any]],
        *,
        timeout: float,
        on_event: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any] | BaseException]:
        return await asyncio.to_thread(self.call_all, make, timeout=timeout, on_event=on_event)

    def close(self) -> None:
        with self._lock:
            workers = [w for w in self._workers if w is not None]
            self._workers = [None] * self.local
        for w in workers:
            w.stop()


def failures(results: Sequence[dict[str, Any] | BaseException]) -> list[str]:
    """The error of each worker that did not succeed."""
    out = []
    for lr, r in enumerate(results):
        if isinstance(r, BaseException):
            out.append(f"{type(r).__name__}: {r}" if not isinstance(r, RankWorkerDied) else str(r))
        elif not r.get("ok"):
            out.append(str(r.get("error") or f"rank worker {lr} failed"))
    return out
