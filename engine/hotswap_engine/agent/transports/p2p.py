"""The `P2P` transport: scale-out catch-up, reading the version from peers' staged host memory
(one-sided Mooncake reads, several peers at once) into one host buffer for the whole model. The
runner then hands that copy to the engine like a broadcast of one (`delivers_to_engine = False`).

`max_bytes_per_second` paces the reads (the pool's transport cap applies to catch-up too). The
record names the peers that served bytes (`peer_bytes`, once the read finished) and those given up
on (`peers_failed`: unreachable at the start, or failed midway).

A new source that serves a version from registered host memory (a trainer's, over Mooncake) is
this class with other `PeerSource`s: `connect_sources` and `read` take any of them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from hotswap_api import protocol

from hotswap_engine.p2p_plan import DEFAULT_CHUNK_BYTES, NoHolderLeft, ReadPlan, plan_reads
from hotswap_engine.pacing import Pacer
from hotswap_engine.transport.base import Transport, UpdateError, UpdateProgress

if TYPE_CHECKING:
    from hotswap_engine.agent.transports.host import TransferHost
    from hotswap_engine.staging import StagedCheckpoint
    from hotswap_engine.transport.p2p import P2PEndpoint, PeerSource

log = logging.getLogger(__name__)

MIN_PACED_CHUNK = 64 << 10


@dataclass(frozen=True)
class PeerJob:
    version: str
    sources: dict[str, PeerSource]  # pod -> what it published
    max_rate: int | None = None
    timeout_s: float | None = None


@dataclass
class PeerLink:
    job: PeerJob
    dest: StagedCheckpoint  # the whole model in one host buffer, laid out from the base checkpoint
    plan: ReadPlan
    failed: list[str] = field(default_factory=list)  # peers left out when contacted


def read_chunk_bytes(max_rate: int | None) -> int:
    """Throttled: reads of about a quarter second at the cap (at least 64 KiB), so the pace is even
    and a peer lost midway leaves fine-grained ranges to spread over the others."""
    if max_rate is None:
        return DEFAULT_CHUNK_BYTES
    return max(MIN_PACED_CHUNK, min(DEFAULT_CHUNK_BYTES, max_rate // 4))


class PeerPull(Transport[PeerJob, PeerLink]):
    name: ClassVar[str] = "P2P"  # protocol.UpdateMode.P2P
    delivers_to_engine: ClassVar[bool] = False

    def __init__(self, host: TransferHost) -> None:
        self.host = host

    @property
    def endpoint(self) -> P2PEndpoint:
        if self.host.p2p is None:
            raise UpdateError("peer-to-peer is unavailable (Mooncake did not start)", engine_touched=False)
        return self.host.p2p

    def job(self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None) -> PeerJob:
        from hotswap_engine.transport.p2p import PeerSource

        self.endpoint  # noqa: B018 - refuse before anything else when there is no endpoint
        try:
            sources = {p.pod: PeerSource.from_dict(p.source.model_dump()) for p in req.peers}
        except ValueError as e:
            raise UpdateError(f"peer-to-peer read failed: {e}", engine_touched=False) from e
        return PeerJob(req.version, sources, req.max_bytes_per_second, req.timeout_seconds)

    async def connect(self, job: PeerJob, progress: UpdateProgress) -> PeerLink:
        dest = self.host.empty_version()
        try:
            return await self.connect_sources(job, dest, progress)
        except Exception as e:
            dest.release()
            raise _read_failed(e, progress) from e

    async def connect_sources(
        self, job: PeerJob, dest: StagedCheckpoint, progress: UpdateProgress
    ) -> PeerLink:
        """Contact every source at once (those that do not answer are left out) and plan the reads;
        `NoHolderLeft` when the ones left do not cover the version (the operator stages from storage)."""
        from hotswap_engine.transport.p2p import staged_layout

        layout = staged_layout(dest)
        holders, left_out = await asyncio.to_thread(self.endpoint.holders, job.sources, layout)
        for pod, why in left_out.items():
            log.warning("p2p: peer %s left out: %s", pod, why)
        failed = list(left_out)
        progress.peers_failed = list(failed)
        plan = plan_reads(layout, holders, read_chunk_bytes(job.max_rate))
        return PeerLink(job, dest, plan, failed)

    async def transfer(self, link: PeerLink, progress: UpdateProgress) -> StagedCheckpoint:
        try:
            await self.read(link, progress)
        except Exception as e:
            link.dest.release()
            raise _read_failed(e, progress) from e
        return link.dest

    async def read(self, link: PeerLink, progress: UpdateProgress) -> None:
        """Run the read plan into `link.dest`, paced, recording who served what."""
        job, dest = link.job, link.dest
        progress.bytes_total = dest.nbytes
        pace = Pacer(job.max_rate)

        def on_progress(done: int, total: int) -> None:
            progress.bytes_done = done
            pace.wait(done)  # runs in the pull's driver thread, between reads

        result = await asyncio.to_thread(
            self.endpoint.pull,
            link.plan,
            dest.segments[0],
            job.sources,
            progress=on_progress,
            timeout_s=job.timeout_s,
        )
        progress.durations["p2p"] = round(result.seconds, 4)
        progress.peer_bytes = dict(result.bytes_by_holder)
        progress.peers_failed = [*link.failed, *result.failed_holders]
        log.info(
            "p2p: pulled %s: %d bytes in %.3fs from %s (failed: %s)",
            job.version,
            result.bytes,
            result.seconds,
            result.bytes_by_holder,
            result.failed_holders,
        )


def _read_failed(e: Exception, progress: UpdateProgress) -> UpdateError:
    """The update's error for a failed read. When some range is held by nobody left, the record
    names every peer given up on (those left out when contacted are in it already)."""
    if isinstance(e, UpdateError):
        return e
    if isinstance(e, NoHolderLeft):
        known = progress.peers_failed
        progress.peers_failed = [*known, *(n for n in e.failed if n not in known)]
    return UpdateError(f"peer-to-peer read failed: {e}", engine_touched=False)
