"""The rendezvous of `transport.process_group` across a membership change, with real gloo groups and
TCPStores on 127.0.0.1 (members are threads of this process, each with its own `GroupCache`, as each
rank worker has one).

The operator reuses the master's address and port across memberships (its base port for the first
attempt of every rollout; a pod's catch-up group sits on that port at its own address), so a member
can reach the master's port while the master still holds its previous group's store.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hotswap_engine.transport.process_group import GroupCache, GroupError, GroupSpec

HOST = "127.0.0.1"
CPU = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def caches() -> Iterator[dict[str, GroupCache]]:
    out = {name: GroupCache() for name in ("pod-a", "pod-b", "pod-c")}
    yield out
    for cache in out.values():
        cache.discard()


class Join(threading.Thread):
    """One member joining `spec` in its own thread; `.error` / `.seconds` once it is done."""

    def __init__(self, cache: GroupCache, spec: GroupSpec, rank: int, timeout: float) -> None:
        super().__init__(daemon=True, name=spec.members[rank])
        self.cache, self.spec, self.rank, self.timeout = cache, spec, rank, timeout
        self.error: str | None = None
        self.seconds = -1.0

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.cache.get(self.spec, self.rank, bind_host=HOST, device=CPU, timeout=self.timeout)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.monotonic() - t0


def form(caches: dict[str, GroupCache], spec: GroupSpec, timeout: float = 10.0) -> None:
    joins = [Join(caches[m], spec, r, timeout) for r, m in enumerate(spec.members)]
    for j in joins:
        j.start()
    for j in joins:
        j.join(timeout + 30)
        assert not j.is_alive() and j.error is None, (j.name, j.error)


def record_clients(monkeypatch: pytest.MonkeyPatch, port: int) -> threading.Event:
    """Set once a member's store client (not a master's) connected to `port`: the real TCPStore
    constructor returns only once it is connected."""
    connected = threading.Event()
    real: Callable[..., dist.TCPStore] = dist.TCPStore

    def tcp_store(*args: Any, **kwargs: Any) -> dist.TCPStore:
        store = real(*args, **kwargs)
        is_master = kwargs.get("is_master", args[3] if len(args) > 3 else False)
        if not is_master and store.port == port:
            connected.set()
        return store

    monkeypatch.setattr(dist, "TCPStore", tcp_store)
    return connected


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (("pod-a",), ("pod-a", "pod-b")),  # pod-a's catch-up group alone, then a broadcast of 2
        (("pod-a", "pod-b"), ("pod-a", "pod-b", "pod-c")),  # scale 2 -> 3
    ],
    ids=["alone-to-2", "2-to-3"],
)
def test_members_early_at_the_masters_previous_store_meet_the_new_group(
    caches: dict[str, GroupCache],
    monkeypatch: pytest.MonkeyPatch,
    before: tuple[str, ...],
    after: tuple[str, ...],
) -> None:
    """The new members reach the master's port before the master dropped its previous group (it
    does that only when its own request arrives): the group must still form at once, first try."""
    port = free_port()
    timeout = 12.0
    form(caches, GroupSpec(before, HOST, port, "gloo"))
    connected = record_clients(monkeypatch, port)
    spec = GroupSpec(after, HOST, port, "gloo")
    others = [Join(caches[m], spec, r, timeout) for r, m in enumerate(after) if r > 0]
    for j in others:
        j.start()
    # The master is late: it joins only once a member's client reached its (old) store.
    assert connected.wait(timeout), "no member connected to the master's port"
    master = Join(caches[after[0]], spec, 0, timeout)
    master.start()
    for j in [master, *others]:
        j.join(timeout + 30)
        assert not j.is_alive(), f"{j.name} still joining"
    errors = {j.name: j.error for j in [master, *others] if j.error}
    assert not errors, errors
    slowest = max(j.seconds for j in [master, *others])
    assert slowest < timeout / 2, f"the group took {slowest:.1f}s of a {timeout:.0f}s timeout"
    # Formed = warmed up with a one-byte broadcast between all members.
    group = caches[after[0]].current
    assert group is not None and group.spec == spec


def test_a_member_that_never_comes_is_reported_as_such(
    caches: dict[str, GroupCache], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    spec = GroupSpec(("pod-a", "pod-b"), HOST, port, "gloo")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(GroupError) as err:
        caches["pod-a"].get(spec, 0, bind_host=HOST, device=CPU, timeout=2.0)
    message = str(err.value)
    assert "rank(s) [1] (pod-b) did not reach the store" in message, message
    assert "Errno" not in message, message
    assert time.monotonic() - t0 < 10
    # A late member is not taken for a torch that cannot adopt a socket (no fallback), and the
    # port is free again for the next attempt.
    assert "binding by port" not in caplog.text, caplog.text
    with socket.socket() as s:
        s.bind((HOST, port))


def test_a_member_whose_master_never_comes_is_reported_as_such(caches: dict[str, GroupCache]) -> None:
    port = free_port()
    spec = GroupSpec(("pod-a", "pod-b"), HOST, port, "gloo")
    with pytest.raises(GroupError, match=f"no store of this group answered on {HOST}:{port} within 2s"):
        caches["pod-b"].get(spec, 1, bind_host=HOST, device=CPU, timeout=2.0)


def test_a_torch_that_cannot_adopt_a_socket_binds_by_port(
    caches: dict[str, GroupCache], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real: Callable[..., dist.TCPStore] = dist.TCPStore

    def no_adoption(*args: Any, master_listen_fd: int | None = None, **kwargs: Any) -> dist.TCPStore:
        if master_listen_fd is not None:
            raise TypeError("__init__(): incompatible function arguments (master_listen_fd)")
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "TCPStore", no_adoption)
    with caplog.at_level(logging.WARNING):
        form(caches, GroupSpec(("pod-a", "pod-b"), HOST, free_port(), "gloo"))
    assert "binding by port" in caplog.text  # and the group formed (warmed up) on both members


def test_a_discarded_groups_store_frees_the_port_even_when_a_cycle_holds_it(
    caches: dict[str, GroupCache],
) -> None:
    """The master's store, still referenced from a reference cycle (as the frames of the error that
    broke a group keep it) when its group is discarded, must not keep listening on the master port:
    the next group there would fail with EADDRINUSE."""
    port = free_port()
    spec = GroupSpec(("pod-a", "pod-b"), HOST, port, "gloo")
    form(caches, spec)
    master = caches["pod-a"].current
    assert master is not None and master.store is not None
    cycle: list[Any] = [master.store]
    cycle.append(cycle)  # garbage only the cyclic GC can free
    del cycle, master
    gc.disable()  # no collection by chance: only `discard` may free it
    try:
        for cache in caches.values():
            cache.discard()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, port))  # as the next master binds it
            s.listen(1)
    finally:
        gc.enable()
