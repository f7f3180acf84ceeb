"""The agent's byte work: staging, the broadcast update, a local re-apply, and the launcher call.

One `UpdateRunner` per agent process. Staging, peer-to-peer and the launcher call happen here; the
collectives happen in one rank worker process per local GPU (`rank_pool`, `rank_worker`), which
keep what is expensive to rebuild across updates: the hand-off socket their vLLM worker connects
to, the transfer slots and streams, and the process group (while the membership is unchanged).
The host buffers (staged parts, full versions) live here and are mapped by the workers (memfds).
A worker whose NCCL group had to be abandoned exits and is replaced; the agent stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hotswap_api import protocol
from hotswap_api.policy import RequestPolicy

from hotswap_engine import buckets, launcher_client, staging
from hotswap_engine.agent import ranks
from hotswap_engine.agent.config import AgentConfig
from hotswap_engine.agent.rank_pool import RankPool, failures
from hotswap_engine.hostmem import HostBuffer, HostBufferPool
from hotswap_engine.p2p_plan import plan_reads
from hotswap_engine.pacing import Pacer
from hotswap_engine.transport.broadcast import allocate_full_version, complete_version, make_plan

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
        self.local = cfg.local_ranks
        self._expected: list[protocol.TensorSpec] | None = None
        # The agent process itself never opens a CUDA context: the rank workers own the GPUs and
        # pin the host buffers they map; buffers here are plain shared memory, reused across
        # versions (the workers keep them mapped and pinned, so pinning is paid once).
        self.host_pool = HostBufferPool(pinned=False)
        self.pool = RankPool(
            self.local,
            cfg.device,
            endpoint=cfg.rank_endpoint,
            workers=cfg.workers if self.local == 1 else 1,
            bind_host=cfg.advertise_address,
            shm_dir=str(cfg.shm_dir),
            timeout=cfg.collective_timeout_s,
        )
        self.p2p = _open_p2p(cfg)
        self.p2p_endpoint: str | None = self.p2p.endpoint if self.p2p else None

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
        staged = staging.stage(
            source.path,
            part,
            roots,
            self.expected,
            manifest=source.sha256_manifest,
            pinned=False,
            pool=self.host_pool,
        )
        # Map (and on CUDA pin) it in the rank workers now, off the update's critical path; workers
        # busy with an update map it when it is used.
        try:
            self.pool.share(staged.segments.values(), wait=False)
        except Exception as e:
            log.warning("could not map the staged version in the rank workers yet: %s", e)
        return staged

    # ---- updates ------------------------------------------------------------------------------

    async def update(
        self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None, rec: UpdateRecord
    ) -> StagedCheckpoint:
        if req.mode is protocol.UpdateMode.P2P:
            return await self._pull_and_apply(req, rec)
        assert req.group is not None and req.rank is not None and staged is not None
        members = sorted(req.group.members, key=lambda m: m.rank)
        pod_parts = {m.rank: (m.part.index, m.part.count) if m.part else None for m in members}
        return await self._transfer(
            req.version,
            req.request_policy,
            _Membership(tuple(m.pod for m in members), req.group.master_addr, req.group.master_port),
            req.rank,
            pod_parts,
            staged,
            rec,
            req.memory_budget_bytes,
            max_rate=req.max_bytes_per_second,
            bucket_bytes=req.bucket_bytes,
        )

    async def _pull_and_apply(self, req: protocol.UpdateRequest, rec: UpdateRecord) -> StagedCheckpoint:
        """Scale-out catch-up: read the version from peers' staged host memory (one-sided Mooncake
        reads, several peers at once), then hand it to the engine like a broadcast of one.

        `req.max_bytes_per_second` paces the reads (the pool's transport cap applies to catch-up
        too). The record names the peers that served bytes (`peer_bytes`, once the read finished)
        and those given up on (`peers_failed`: unreachable at the start, or failed midway)."""
        from hotswap_engine.p2p_plan import DEFAULT_CHUNK_BYTES, NoHolderLeft
        from hotswap_engine.transport.p2p import PeerSource, staged_layout

        if self.p2p is None:
            raise UpdateError("peer-to-peer is unavailable (Mooncake did not start)", engine_touched=False)
        p2p = self.p2p
        dest = self._empty_version()
        failed: list[str] = []
        try:
            rec.stage = protocol.UpdateStage.CONNECTING
            t0 = time.perf_counter()
            sources = {p.pod: PeerSource.from_dict(p.source.model_dump()) for p in req.peers}
            layout = staged_layout(dest)
            holders, left_out = await asyncio.to_thread(p2p.holders, sources, layout)
            for pod, why in left_out.items():
                log.warning("p2p: peer %s left out: %s", pod, why)
            failed.extend(left_out)
            rec.peers_failed = list(failed)
            # Throttled: reads of about a quarter second at the cap (at least 64 KiB), so the pace is
            # even and a peer lost midway leaves fine-grained ranges to spread over the others.
            chunk = DEFAULT_CHUNK_BYTES
            if req.max_bytes_per_second is not None:
                chunk = max(64 << 10, min(chunk, req.max_bytes_per_second // 4))
            plan = plan_reads(layout, holders, chunk)  # NoHolderLeft: the operator stages from storage
            rec.durations["connect"] = round(time.perf_counter() - t0, 4)
            rec.stage = protocol.UpdateStage.TRANSFERRING
            rec.bytes_total = dest.nbytes
            pace = Pacer(req.max_bytes_per_second)

            def progress(done: int, total: int) -> None:
                rec.bytes_done = done
                pace.wait(done)  # runs in the pull's driver thread, between reads

            result = await asyncio.to_thread(
                p2p.pull, plan, dest.segments[0], sources, progress=progress, timeout_s=req.timeout_seconds
            )
            rec.durations["p2p"] = round(result.seconds, 4)
            rec.peer_bytes = dict(result.bytes_by_holder)
            rec.peers_failed = [*failed, *result.failed_holders]
            log.info(
                "p2p: pulled %s: %d bytes in %.3fs from %s (failed: %s)",
                req.version,
                result.bytes,
                result.seconds,
                result.bytes_by_holder,
                result.failed_holders,
            )
        except Exception as e:
            if isinstance(e, NoHolderLeft):
                rec.peers_failed = [*failed, *(n for n in e.failed if n not in failed)]
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
        buffer = HostBuffer(layout.nbytes, pinned=False)
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
        await self._apply_alone(version or "base", full, rec, RequestPolicy.KEEP)

    async def _apply_alone(
        self, rec_version: str, full: StagedCheckpoint, rec: UpdateRecord, policy: RequestPolicy
    ) -> None:
        host = self.cfg.advertise_address
        alone = _Membership((self.cfg.pod_name,), host, _free_port(host))
        out = await self._transfer(
            rec_version,
            policy,
            alone,
            0,
            {0: None},
            full,
            rec,
            protocol.DEFAULT_MEMORY_BUDGET_BYTES,
            keep_group=False,
        )
        # `full` holds every part, so the transfer filled no new buffer: `out` shares full's buffers
        # and must not be released (that would free the version being served).
        assert out.segments.keys() == full.segments.keys()

    async def _transfer(
        self,
        version: str,
        policy: RequestPolicy,
        members: _Membership,
        pod_rank: int,
        pod_parts: dict[int, tuple[int, int] | None],
        staged: StagedCheckpoint,
        rec: UpdateRecord,
        memory_budget: int,
        keep_group: bool = True,
        max_rate: int | None = None,
        bucket_bytes: int | None = None,
    ) -> StagedCheckpoint:
        """One broadcast through this pod's rank workers: form (or reuse) the group of
        `pods × local` ranks, move every bucket into every worker's vLLM worker and into the full
        version's host buffers, and run the engine's reload through the launcher."""
        cfg = self.cfg
        pool = self.pool
        timeout = cfg.collective_timeout_s
        rec.stage = protocol.UpdateStage.CONNECTING
        t0 = time.perf_counter()
        try:
            fixed = (bucket_bytes, 4) if bucket_bytes else None
            plan, layout = make_plan(staged, memory_budget, fixed=fixed)
        except ValueError as e:  # e.g. a budget too small for this model: nothing was touched yet
            raise UpdateError(f"cannot plan the update: {e}", engine_touched=False) from e
        try:
            await asyncio.to_thread(pool.ensure)
            rl = ranks.RankLayout(pod_rank, len(members.pods), self.local)
            group_msg = {
                "op": "group",
                "members": list(ranks.member_names(members.pods, self.local)),
                "master_addr": members.master_addr,
                "master_port": members.master_port,
                "backend": "nccl" if cfg.device == "cuda" else "gloo",
            }
            # A membership change on NCCL replaces the workers that hold the old group (their
            # communicator cannot be torn down safely in-process); every member decides this
            # locally before the rendezvous, so all of them meet the new group with fresh state.
            prepared = await pool.acall_all(
                lambda lr: {**group_msg, "op": "prepare", "rank": rl.global_rank(lr)}, timeout=timeout
            )
            errors = failures(prepared)
            if errors:
                raise RuntimeError("; ".join(errors))
            stale = [lr for lr, r in enumerate(prepared) if isinstance(r, dict) and r.get("restart")]
            if stale:
                log.info("new membership: replacing rank worker(s) %s that hold the old NCCL group", stale)
                await asyncio.to_thread(pool.replace, stale)
                await asyncio.to_thread(pool.ensure)
            results = await pool.acall_all(
                lambda lr: {**group_msg, "rank": rl.global_rank(lr)}, timeout=timeout * 2 + 30
            )
            errors = failures(results)
            if errors:
                raise RuntimeError("; ".join(errors))
        except Exception as e:
            await self._discard()
            raise UpdateError(f"could not form the process group: {e}", engine_touched=False) from e
        rec.durations["connect"] = round(time.perf_counter() - t0, 4)

        full_out: dict[int, HostBuffer] = allocate_full_version(
            staged, plan, pinned=False, pool=self.host_pool
        )
        rec.bytes_total = sum(p.nbytes for p in plan.parts)
        rec.stage = protocol.UpdateStage.TRANSFERRING
        try:
            await asyncio.to_thread(pool.share, [*staged.segments.values(), *full_out.values()])
            endpoint = pool.endpoint()
        except Exception as e:
            for b in full_out.values():
                b.close()
            await self._discard()
            raise UpdateError(
                f"rank workers could not map the host buffers: {e}", engine_touched=False
            ) from e
        seg_ids = dict(zip(staged.segments, pool.buffer_ids(staged.segments.values()), strict=True))
        out_ids = dict(zip(full_out, pool.buffer_ids(full_out.values()), strict=True))
        message = {
            "op": "broadcast",
            "version": version,
            "staged": {
                "specs": [[s.name, s.dtype, list(s.shape)] for s in staged.specs],
                "assignment": staged.assignment,
                "part_count": staged.part_count,
                "alignment": staged.alignment,
                "segments": seg_ids,
            },
            "full_out": out_ids,
            "pod_parts": ranks.parts_to_wire(pod_parts),
            "local": self.local,
            "bucket_bytes": plan.bucket_bytes,
            "slots": layout.slots,
            "op_timeout": timeout,
            "max_rate": max_rate,
        }
        done = [0] * self.local

        def progress(lr: int, event: dict[str, Any]) -> None:
            done[lr] = int(event.get("bytes", 0))
            rec.bytes_done = min(done)

        # The launcher runs the receiving side inside vLLM (between engine steps, engine paused);
        # it answers only when every worker finished the reload, or failed.
        apply = asyncio.create_task(
            launcher_client.apply(str(cfg.control_socket), endpoint, version, policy, timeout=timeout * 4)
        )
        t1 = time.perf_counter()
        results = await pool.acall_all(lambda lr: message, timeout=timeout * 2 + 30, on_event=progress)
        errors = failures(results)
        if errors:
            await self._discard()
            for b in full_out.values():
                b.close()
            engine_error = await _settle(apply, timeout)
            detail = f"; the engine said: {engine_error}" if engine_error else ""
            raise UpdateError(f"transfer failed: {'; '.join(errors)}{detail}")
        stats = [r["stats"] for r in results if isinstance(r, dict)]
        rec.bytes_done = rec.bytes_total
        rec.durations["transfer"] = round(max(s["seconds"] for s in stats), 4)
        rec.stage = protocol.UpdateStage.RELOADING
        t2 = time.perf_counter()
        result = await apply
        end_seconds = max(s["end_seconds"] for s in stats)
        rec.durations["reload"] = round(end_seconds + (time.perf_counter() - t2), 4)
        if not result.ok:
            for b in full_out.values():
                b.close()
            raise UpdateError(f"the engine failed to apply {version}: {result.error}")
        if not keep_group:
            await self._discard()
        log.info(
            "applied %s: %d bytes in %.3fs (transfer %.3fs, %d rank workers)",
            version,
            rec.bytes_total,
            time.perf_counter() - t1,
            rec.durations["transfer"],
            self.local,
        )
        return complete_version(staged, full_out)

    async def _discard(self) -> None:
        """Drop every worker's group (a worker that abandoned an NCCL group has exited already)."""
        await self.pool.acall_all(lambda lr: {"op": "discard"}, timeout=self.cfg.collective_timeout_s + 30)

    def release_unused(self) -> None:
        """Let the rank workers unmap host buffers the agent freed."""
        self.pool.unmap_closed()

    def close(self) -> None:
        self.pool.close()
        self.host_pool.clear()
        if self.p2p is not None:
            self.p2p.close()


@dataclass(frozen=True)
class _Membership:
    pods: tuple[str, ...]  # by pod rank
    master_addr: str
    master_port: int


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


def _free_port(host: str) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
