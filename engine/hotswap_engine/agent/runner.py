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
from typing import TYPE_CHECKING

import torch

from hotswap_engine import launcher_client, protocol, staging
from hotswap_engine.agent.config import AgentConfig
from hotswap_engine.handoff import HandoffSender
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
    from hotswap_engine.hostmem import HostBuffer
    from hotswap_engine.staging import StagedCheckpoint

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
        self.p2p_endpoint: str | None = None

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
        if req.mode is not protocol.UpdateMode.BROADCAST:
            raise UpdateError("p2p updates are not supported by this agent yet", engine_touched=False)
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
        )

    async def apply_local(self, version: str | None, full: StagedCheckpoint) -> None:
        """Hand a complete host copy to the engine through the same pipeline, in a group of one."""
        spec = GroupSpec(
            (self.cfg.pod_name,), self.cfg.advertise_address, _free_port(self.cfg.advertise_address)
        )
        rec_version = version or "base"
        from hotswap_engine.agent.service import UpdateRecord

        rec = UpdateRecord(id="local", version=rec_version, mode=protocol.UpdateMode.BROADCAST)
        try:
            out = await self._transfer(
                rec_version,
                protocol.RequestPolicy.KEEP,
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
        if out is not full:
            out.release()

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

        plan, layout = make_plan(staged, memory_budget)
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
