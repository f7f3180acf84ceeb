"""The `Broadcast` transport: a process group of `pods × local` rank workers moves every bucket into
every worker's vLLM worker and into the full version's host buffers, while the launcher runs the
engine's reload (it answers once every worker applied, or failed).

The collectives happen in the rank workers (`rank_pool`, `rank_worker`); this module forms their
group, sends them the update and waits. A group of one (`GroupBroadcast.alone`) is how a host copy
that another source filled (p2p, a rollback) reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from hotswap_api import protocol
from hotswap_api.policy import RequestPolicy

from hotswap_engine import launcher_client
from hotswap_engine.agent import ranks
from hotswap_engine.agent.rank_pool import failures
from hotswap_engine.transport.base import Transport, UpdateError, UpdateProgress
from hotswap_engine.transport.broadcast import allocate_full_version, complete_version, make_plan

if TYPE_CHECKING:
    from hotswap_engine import buckets
    from hotswap_engine.agent.transports.host import TransferHost
    from hotswap_engine.hostmem import HostBuffer
    from hotswap_engine.staging import StagedCheckpoint

log = logging.getLogger("hotswap_engine.agent.runner")

ALONE_SLOTS = 4  # slots when a request fixes the bucket size (`bucket_bytes`)


@dataclass(frozen=True)
class Membership:
    pods: tuple[str, ...]  # by pod rank
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class BroadcastJob:
    version: str
    policy: RequestPolicy
    members: Membership
    pod_rank: int
    pod_parts: dict[int, tuple[int, int] | None]  # pod rank -> the part it staged (None: all)
    staged: StagedCheckpoint
    memory_budget: int
    keep_group: bool = True  # False: drop the group afterwards (a group of one is not reused)
    max_rate: int | None = None
    bucket_bytes: int | None = None


@dataclass(frozen=True)
class BroadcastLink:
    job: BroadcastJob
    plan: buckets.BucketPlan
    layout: buckets.Layout


class GroupBroadcast(Transport[BroadcastJob, BroadcastLink]):
    name: ClassVar[str] = "Broadcast"  # protocol.UpdateMode.BROADCAST
    delivers_to_engine: ClassVar[bool] = True

    def __init__(self, host: TransferHost) -> None:
        self.host = host

    # ---- jobs -----------------------------------------------------------------------------------

    def job(self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None) -> BroadcastJob:
        if req.group is None or req.rank is None or staged is None:
            raise UpdateError(
                "a broadcast needs a group, this pod's rank and a staged version", engine_touched=False
            )
        members = sorted(req.group.members, key=lambda m: m.rank)
        return BroadcastJob(
            version=req.version,
            policy=req.request_policy,
            members=Membership(tuple(m.pod for m in members), req.group.master_addr, req.group.master_port),
            pod_rank=req.rank,
            pod_parts={m.rank: (m.part.index, m.part.count) if m.part else None for m in members},
            staged=staged,
            memory_budget=req.memory_budget_bytes,
            max_rate=req.max_bytes_per_second,
            bucket_bytes=req.bucket_bytes,
        )

    def alone(
        self, version: str, full: StagedCheckpoint, policy: RequestPolicy, master_port: int
    ) -> BroadcastJob:
        """A complete host copy into this pod's engine, in a group of one (not kept afterwards)."""
        cfg = self.host.cfg
        return BroadcastJob(
            version=version,
            policy=policy,
            members=Membership((cfg.pod_name,), cfg.advertise_address, master_port),
            pod_rank=0,
            pod_parts={0: None},
            staged=full,
            memory_budget=protocol.DEFAULT_MEMORY_BUDGET_BYTES,
            keep_group=False,
        )

    # ---- connect: the plan and the group ----------------------------------------------------------

    async def connect(self, job: BroadcastJob, progress: UpdateProgress) -> BroadcastLink:
        try:
            fixed = (job.bucket_bytes, ALONE_SLOTS) if job.bucket_bytes else None
            plan, layout = make_plan(job.staged, job.memory_budget, fixed=fixed)
        except ValueError as e:  # e.g. a budget too small for this model: nothing was touched yet
            raise UpdateError(f"cannot plan the update: {e}", engine_touched=False) from e
        try:
            await self._form_group(job)
        except Exception as e:
            await self.discard()
            raise UpdateError(f"could not form the process group: {e}", engine_touched=False) from e
        return BroadcastLink(job, plan, layout)

    async def _form_group(self, job: BroadcastJob) -> None:
        """Form (or reuse) the group of `pods × local` ranks in the rank workers."""
        pool = self.host.pool
        timeout = self.host.cfg.collective_timeout
        local = self.host.cfg.local_ranks
        await asyncio.to_thread(pool.ensure)
        rl = ranks.RankLayout(job.pod_rank, len(job.members.pods), local)
        group_msg = {
            "op": "group",
            "members": list(ranks.member_names(job.members.pods, local)),
            "master_addr": job.members.master_addr,
            "master_port": job.members.master_port,
            "backend": "nccl" if self.host.cfg.device == "cuda" else "gloo",
        }
        # A membership change on NCCL replaces the workers that hold the old group (their
        # communicator cannot be torn down safely in-process); every member decides this
        # locally before the rendezvous, so all of them meet the new group with fresh state.
        prepared = await pool.acall_all(
            lambda lr: {**group_msg, "op": "prepare", "rank": rl.global_rank(lr)}, timeout=timeout
        )
        _raise_failures(prepared)
        stale = [lr for lr, r in enumerate(prepared) if isinstance(r, dict) and r.get("restart")]
        if stale:
            log.info("new membership: replacing rank worker(s) %s that hold the old NCCL group", stale)
            await asyncio.to_thread(pool.replace, stale)
            await asyncio.to_thread(pool.ensure)
        results = await pool.acall_all(
            lambda lr: {**group_msg, "rank": rl.global_rank(lr)}, timeout=timeout * 2 + 30
        )
        _raise_failures(results)

    # ---- transfer: the rank workers broadcast, the launcher reloads --------------------------------

    async def transfer(self, link: BroadcastLink, progress: UpdateProgress) -> StagedCheckpoint:
        job, plan = link.job, link.plan
        timeout = self.host.cfg.collective_timeout
        full_out: dict[int, HostBuffer] = allocate_full_version(
            job.staged, plan, pinned=False, pool=self.host.host_pool
        )
        progress.bytes_total = sum(p.nbytes for p in plan.parts)
        message = await self._share_buffers(link, full_out)
        # The launcher runs the receiving side inside vLLM (between engine steps, engine paused);
        # it answers only when every worker finished the reload, or failed.
        apply = asyncio.create_task(
            launcher_client.apply(
                str(self.host.cfg.control_socket),
                self.host.pool.endpoint(),
                job.version,
                job.policy,
                timeout=timeout * 4,
                digests=True,  # every worker fingerprints what it receives (agent.verify checks them)
            )
        )
        t1 = time.perf_counter()
        stats = await self._run_rank_workers(message, progress, full_out, apply)
        progress.bytes_done = progress.bytes_total
        progress.durations["transfer"] = round(max(s["seconds"] for s in stats), 4)
        progress.stage = protocol.UpdateStage.RELOADING
        await self._await_reload(apply, job.version, max(s["end_seconds"] for s in stats), progress, full_out)
        if not job.keep_group:
            await self.discard()
        log.info(
            "applied %s: %d bytes in %.3fs (transfer %.3fs, %d rank workers)",
            job.version,
            progress.bytes_total,
            time.perf_counter() - t1,
            progress.durations["transfer"],
            self.host.cfg.local_ranks,
        )
        return complete_version(job.staged, full_out)

    async def _share_buffers(self, link: BroadcastLink, full_out: dict[int, HostBuffer]) -> dict[str, Any]:
        """Map the staged and full-version host buffers in the rank workers; their `broadcast` command."""
        pool = self.host.pool
        staged = link.job.staged
        try:
            await asyncio.to_thread(pool.share, [*staged.segments.values(), *full_out.values()])
        except Exception as e:
            _close(full_out)
            await self.discard()
            raise UpdateError(
                f"rank workers could not map the host buffers: {e}", engine_touched=False
            ) from e
        return broadcast_message(
            link,
            segment_ids=dict(zip(staged.segments, pool.buffer_ids(staged.segments.values()), strict=True)),
            full_out_ids=dict(zip(full_out, pool.buffer_ids(full_out.values()), strict=True)),
            local=self.host.cfg.local_ranks,
            op_timeout=self.host.cfg.collective_timeout,
        )

    async def _run_rank_workers(
        self,
        message: dict[str, Any],
        progress: UpdateProgress,
        full_out: dict[int, HostBuffer],
        apply: asyncio.Task[launcher_client.ApplyResult],
    ) -> list[dict[str, Any]]:
        """Every rank worker's broadcast; their stats. A failure reports the engine's side too."""
        timeout = self.host.cfg.collective_timeout
        done = [0] * self.host.cfg.local_ranks

        def on_event(lr: int, event: dict[str, Any]) -> None:
            done[lr] = int(event.get("bytes", 0))
            progress.bytes_done = min(done)

        results = await self.host.pool.acall_all(
            lambda lr: message, timeout=timeout * 2 + 30, on_event=on_event
        )
        errors = failures(results)
        if errors:
            await self.discard()
            _close(full_out)
            engine_error = await _settle(apply, timeout)
            detail = f"; the engine said: {engine_error}" if engine_error else ""
            raise UpdateError(f"transfer failed: {'; '.join(errors)}{detail}")
        return [r["stats"] for r in results if isinstance(r, dict)]

    async def _await_reload(
        self,
        apply: asyncio.Task[launcher_client.ApplyResult],
        version: str,
        end_seconds: float,
        progress: UpdateProgress,
        full_out: dict[int, HostBuffer],
    ) -> None:
        t2 = time.perf_counter()
        result = await apply
        progress.durations["reload"] = round(end_seconds + (time.perf_counter() - t2), 4)
        if not result.ok:
            _close(full_out)
            raise UpdateError(f"the engine failed to apply {version}: {result.error}")
        progress.engine_workers = list(result.workers)

    async def discard(self) -> None:
        """Drop every worker's group (a worker that abandoned an NCCL group has exited already)."""
        await self.host.pool.acall_all(
            lambda lr: {"op": "discard"}, timeout=self.host.cfg.collective_timeout + 30
        )


def broadcast_message(
    link: BroadcastLink,
    *,
    segment_ids: dict[int, int],
    full_out_ids: dict[int, int],
    local: int,
    op_timeout: float,
) -> dict[str, Any]:
    """The rank workers' `broadcast` command (see `rank_worker`): buffers by their shared ids."""
    job, staged = link.job, link.job.staged
    return {
        "op": "broadcast",
        "version": job.version,
        "staged": {
            "specs": [[s.name, s.dtype, list(s.shape)] for s in staged.specs],
            "assignment": staged.assignment,
            "part_count": staged.part_count,
            "alignment": staged.alignment,
            "segments": segment_ids,
        },
        "full_out": full_out_ids,
        "pod_parts": ranks.parts_to_wire(job.pod_parts),
        "local": local,
        "bucket_bytes": link.plan.bucket_bytes,
        "slots": link.layout.slots,
        "op_timeout": op_timeout,
        "max_rate": job.max_rate,
    }


def _raise_failures(results: list[Any]) -> None:
    errors = failures(results)
    if errors:
        raise RuntimeError("; ".join(errors))


def _close(buffers: dict[int, HostBuffer]) -> None:
    for b in buffers.values():
        b.close()


async def _settle(task: asyncio.Task[launcher_client.ApplyResult], timeout: float) -> str | None:
    """Wait (bounded) for the launcher's answer after a failed transfer, to report the engine's side."""
    try:
        result = await asyncio.wait_for(task, timeout)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None if result.ok else result.error
