"""The agent's byte work: staging, the broadcast update, a local re-apply, and the launcher call.

One `UpdateRunner` per agent process. It keeps what is expensive to rebuild across updates: the
hand-off socket the vLLM workers connect to, the transfer slots and streams, and the process group
(while the membership is unchanged). Blocking work runs in a worker thread; the hand-off sender and
the group are only ever used from that one thread at a time (the service runs one update at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Literal

import torch

from hotswap_engine import buckets, launcher_client, protocol, staging
from hotswap_engine.agent.config import AgentConfig
from hotswap_engine.handoff import HandoffSender
from hotswap_engine.hostmem import HostBuffer
from hotswap_engine.p2p_plan import plan_reads
from hotswap_engine.transport.broadcast import (
    BroadcastTransport,
    allocate_full_version,
    complete_version,
    make_plan,
    run_broadcast,
)
from hotswap_engine.transport.process_group import GroupCache, GroupSpec

if TYPE_CHECKING:
    from hotswap_engine.agent.service import UpdateRecord
    from hotswap_engine.staging import StagedCheckpoint
    from hotswap_engine.transport.p2p import P2PEndpoint

log = logging.getLogger(__name__)


class UpdateError(RuntimeError):
    """An update failed; the message says where (group, transfer, or the engine's reload).
    `engine_touched` is False when it failed before any byte reached the engine (no rollback needed)."""

    def __init__(self, message: str, *, engine_touched: bool = True) -> None:
        super().__init__(message)
        self.engine_touched = engine_touched


class UpdateRunner:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
        )
        self._expected: list[protocol.TensorSpec] | None = None
        self.groups = GroupCache()
        self.transport = BroadcastTransport(self.device)
        self.sender = HandoffSender(cfg.handoff_endpoint, cfg.workers, timeout=cfg.collective_timeout_s)
        self.p2p = _open_p2p(cfg)
        self.p2p_endpoint: str | None = self.p2p.endpoint if self.p2p else None

    @property
    def must_exit(self) -> bool:
        """A failed NCCL group was abandoned: this process must not use the GPU again."""
        return self.groups.needs_exit

    # ---- staging ------------------------------------------------------------------------------

    @property
    def expected(self) -> list[protocol.TensorSpec]:
        """The served model's tensors, from the base checkpoint's headers (read once)."""
        if self._expected is None:
            self._expected = [loc.spec for loc in staging.read_index(self.cfg.base_checkpoint)]
        return self._expected

    def stage(
        self, source: protocol.Source, part: protocol.PartSpec | None, trusted: bool = False
    ) -> StagedCheckpoint:
        """Validate and read a checkpoint (blocking). `trusted` is for re-reading the base checkpoint
        the engine was started with, which need not lie under an allowed root."""
        roots = [*self.cfg.allowed_roots]
        if trusted:
            roots.append(self.cfg.base_checkpoint)
        return staging.stage(
            source.path,
            part,
            roots,
            self.expected,
            manifest=source.sha256_manifest,
            pinned=self.device.type == "cuda",
        )

    # ---- updates ------------------------------------------------------------------------------

    async def update(
        self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None, rec: UpdateRecord
    ) -> StagedCheckpoint:
        if req.mode is protocol.UpdateMode.P2P:
            return await self._pull_and_apply(req, rec)
        assert req.group is not None and req.rank is not None and staged is not None
        members = sorted(req.group.members, key=lambda m: m.rank)
        spec = GroupSpec(
            tuple(m.pod for m in members),
            req.group.master_addr,
            req.group.master_port,
            "nccl" if self.device.type == "cuda" else "gloo",
        )
        member_parts = {m.rank: (m.part.index, m.part.count) if m.part else None for m in members}
        return await self._transfer(
            req.version,
            req.request_policy,
            spec,
            req.rank,
            member_parts,
            staged,
            rec,
            req.memory_budget_bytes,
            max_rate=req.max_bytes_per_second,
            bucket_bytes=req.bucket_bytes,
        )

    async def _pull_and_apply(self, req: protocol.UpdateRequest, rec: UpdateRecord) -> StagedCheckpoint:
        """Scale-out catch-up: read the version from peers' staged host memory (one-sided Mooncake
        reads, several peers at once), then hand it to the engine like a broadcast of one."""
        from hotswap_engine.transport.p2p import PeerSource, staged_layout

        if self.p2p is None:
            raise UpdateError("peer-to-peer is unavailable (Mooncake did not start)", engine_touched=False)
        p2p = self.p2p
        dest = self._empty_version()
        try:
            rec.stage = protocol.UpdateStage.CONNECTING
            t0 = time.perf_counter()
            sources = {p.pod: PeerSource.from_dict(p.source.model_dump()) for p in req.peers}
            layout = staged_layout(dest)
            holders, left_out = await asyncio.to_thread(p2p.holders, sources, layout)
            for pod, why in left_out.items():
                log.warning("p2p: peer %s left out: %s", pod, why)
            plan = plan_reads(layout, holders)  # NoHolderLeft: the operator stages from storage instead
            rec.durations["connect"] = round(time.perf_counter() - t0, 4)
            rec.stage = protocol.UpdateStage.TRANSFERRING
            rec.bytes_total = dest.nbytes

            def progress(done: int, total: int) -> None:
                rec.bytes_done = done

            result = await asyncio.to_thread(
                p2p.pull, plan, dest.segments[0], sources, progress=progress, timeout_s=req.timeout_seconds
            )
            rec.durations["p2p"] = round(result.seconds, 4)
            log.info(
                "p2p: pulled %s: %d bytes in %.3fs from %s (failed: %s)",
                req.version,
                result.bytes,
                result.seconds,
                result.bytes_by_holder,
                result.failed_holders,
            )
        except Exception as e:
            dest.release()
            raise UpdateError(f"peer-to-peer read failed: {e}", engine_touched=False) from e
        try:
            await self._apply_alone(req.version, dest, rec, req.request_policy)
        except Exception:
            dest.release()
            raise
        return dest

    def _empty_version(self) -> StagedCheckpoint:
        """A host buffer laid out for the whole served model (shapes from the base checkpoint, never
        from a peer's table)."""
        specs = self.expected
        sizes = [(s.name, staging.tensor_nbytes(s.dtype, s.shape)) for s in specs]
        items = [buckets.TensorItem(name, n, 0) for name, n in sizes]
        layout = buckets.layout_part(items, 0, buckets.DEFAULT_ALIGNMENT)
        buffer = HostBuffer(layout.nbytes, pinned=self.device.type == "cuda")
        return staging.StagedCheckpoint(specs, {name: 0 for name, _ in sizes}, 1, {0: buffer})

    def publish(self, version: str, full: StagedCheckpoint) -> protocol.P2PSource | None:
        """Offer a complete version to peers (scale-out readers); None without p2p."""
        from hotswap_engine.transport.p2p import staged_layout

        if self.p2p is None or not full.complete:
            return None
        source = self.p2p.publish(version, full.segments, staged_layout(full))
        return protocol.P2PSource.model_validate(source.to_dict())

    def withdraw(self, version: str) -> None:
        if self.p2p is not None:
            self.p2p.withdraw(version)

    async def apply_local(self, version: str | None, full: StagedCheckpoint) -> None:
        """Hand a complete host copy to the engine through the same pipeline, in a group of one."""
        from hotswap_engine.agent.service import UpdateRecord

        rec = UpdateRecord(id="local", version=version or "base", mode=protocol.UpdateMode.BROADCAST)
        await self._apply_alone(version or "base", full, rec, protocol.RequestPolicy.KEEP)

    async def _apply_alone(
        self, rec_version: str, full: StagedCheckpoint, rec: UpdateRecord, policy: protocol.RequestPolicy
    ) -> None:
        host = self.cfg.advertise_address
        spec = GroupSpec((self.cfg.pod_name,), host, _free_port(host))
        try:
            out = await self._transfer(
                rec_version,
                policy,
                spec,
                0,
                {0: None},
                full,
                rec,
                protocol.DEFAULT_MEMORY_BUDGET_BYTES,
                keep_group=False,
            )
        finally:
            self.groups.discard()
        # `full` holds every part, so the transfer filled no new buffer: `out` shares full's buffers
        # and must not be released (that would free the version being served).
        assert out.segments.keys() == full.segments.keys()

    async def _transfer(
        self,
        version: str,
        policy: protocol.RequestPolicy,
        spec: GroupSpec,
        rank: int,
        member_parts: dict[int, tuple[int, int] | None],
        staged: StagedCheckpoint,
        rec: UpdateRecord,
        memory_budget: int,
        keep_group: bool = True,
        max_rate: int | None = None,
        bucket_bytes: int | None = None,
    ) -> StagedCheckpoint:
        cfg = self.cfg
        rec.stage = protocol.UpdateStage.CONNECTING
        t0 = time.perf_counter()
        try:
            group = await asyncio.to_thread(
                self.groups.get,
                spec,
                rank,
                bind_host=cfg.advertise_address,
                device=self.device,
                timeout=cfg.collective_timeout_s,
            )
        except Exception as e:
            self.groups.discard()
            raise UpdateError(f"could not form the process group: {e}", engine_touched=False) from e
        rec.durations["connect"] = round(time.perf_counter() - t0, 4)

        try:
            fixed = (bucket_bytes, 4) if bucket_bytes else None
            plan, layout = make_plan(staged, memory_budget, fixed=fixed)
        except ValueError as e:  # e.g. a budget too small for this model: nothing was touched yet
            raise UpdateError(f"cannot plan the update: {e}", engine_touched=False) from e
        full_out: dict[int, HostBuffer] = allocate_full_version(
            staged, plan, pinned=self.device.type == "cuda"
        )
        rec.bytes_total = sum(p.nbytes for p in plan.parts)
        rec.stage = protocol.UpdateStage.TRANSFERRING

        pace = _Pacer(max_rate)

        def progress(done: int) -> None:
            rec.bytes_done = done
            pace.wait(done)  # runs in the transfer thread between buckets

        # The launcher runs the receiving side inside vLLM (between engine steps, engine paused);
        # it answers only when every worker finished the reload, or failed.
        apply = asyncio.create_task(
            launcher_client.apply(
                str(cfg.control_socket),
                self.sender.endpoint,
                version,
                policy.value,
                timeout=cfg.collective_timeout_s * 4,
            )
        )
        t1 = time.perf_counter()
        try:
            stats = await asyncio.to_thread(
                run_broadcast,
                group,
                staged,
                plan,
                layout,
                member_parts,
                self.sender,
                version,
                self.transport,
                full_out=full_out,
                progress=progress,
                op_timeout=cfg.collective_timeout_s,
            )
        except Exception as e:
            self.groups.discard()
            for b in full_out.values():
                b.close()
            engine_error = await _settle(apply, cfg.collective_timeout_s)
            detail = f"; the engine said: {engine_error}" if engine_error else ""
            raise UpdateError(f"transfer failed: {e}{detail}") from e
        rec.durations["transfer"] = round(stats.seconds, 4)
        rec.stage = protocol.UpdateStage.RELOADING
        t2 = time.perf_counter()
        result = await apply
        rec.durations["reload"] = round(stats.end_seconds + (time.perf_counter() - t2), 4)
        if not result.ok:
            for b in full_out.values():
                b.close()
            raise UpdateError(f"the engine failed to apply {version}: {result.error}")
        if not keep_group:
            self.groups.discard()
        log.info(
            "applied %s: %d bytes in %.3fs (transfer %.3fs)",
            version,
            rec.bytes_total,
            time.perf_counter() - t1,
            stats.seconds,
        )
        return complete_version(staged, full_out)

    def close(self) -> None:
        self.groups.discard()
        self.transport.close()
        self.sender.close()
        if self.p2p is not None:
            self.p2p.close()


def _open_p2p(cfg: AgentConfig) -> P2PEndpoint | None:
    """This pod's Mooncake endpoint on its own address; without one the pod still takes broadcasts."""
    from hotswap_engine.transport.p2p import P2PEndpoint, P2PError

    proto: Literal["tcp", "rdma"] = "rdma" if cfg.p2p_protocol == "rdma" else "tcp"
    try:
        return P2PEndpoint(cfg.advertise_address, proto, cfg.p2p_device)
    except P2PError as e:
        log.warning("peer-to-peer disabled: %s", e)
        return None


async def _settle(task: asyncio.Task[launcher_client.ApplyResult], timeout: float) -> str | None:
    """Wait (bounded) for the launcher's answer after a failed transfer, to report the engine's side."""
    try:
        result = await asyncio.wait_for(task, timeout)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if result.ok else result.error


class _Pacer:
    """Sleeps so that `done` bytes take at least done / rate seconds since the first call."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.t0: float | None = None

    def wait(self, done: int) -> None:
        if self.rate is None:
            return
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        ahead = done / self.rate - (now - self.t0)
        if ahead > 0:
            time.sleep(ahead)


def _free_port(host: str) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
