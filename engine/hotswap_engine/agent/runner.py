"""The agent's byte work: staging, updates through the transport a request names, a local re-apply.

One `UpdateRunner` per agent process. It stages versions and drives every update through the one
transport interface (`transport.base.Transport`, looked up by the request's mode in the
registry): connect, transfer, and, for a source that only filled host memory (p2p), the hand-off
to the engine as a broadcast of one. The transports themselves live in `agent.transports`; the
collectives happen in one rank worker process per local GPU (`rank_pool`, `rank_worker`), which
keep what is expensive to rebuild across updates: the hand-off socket their vLLM worker connects
to, the transfer slots and streams, and the process group (while the membership is unchanged).
The host buffers (staged parts, full versions) live here and are mapped by the workers (memfds).
A worker whose NCCL group had to be abandoned exits and is replaced; the agent stays up.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from hotswap_engine import buckets, protocol, staging
from hotswap_engine.agent.rank_pool import RankPool
from hotswap_engine.agent.settings import AgentSettings
from hotswap_engine.agent.transports.broadcast import GroupBroadcast
from hotswap_engine.agent.transports.host import TransferHost
from hotswap_engine.hostmem import HostBuffer, HostBufferPool
from hotswap_engine.transport.base import Transport, UpdateError, create_transport

if TYPE_CHECKING:
    from hotswap_engine.agent.service import UpdateRecord
    from hotswap_engine.staging import StagedCheckpoint
    from hotswap_engine.transport.p2p import P2PEndpoint

log = logging.getLogger(__name__)

__all__ = ["UpdateError", "UpdateRunner"]

JobT = TypeVar("JobT")


class UpdateRunner:
    def __init__(self, cfg: AgentSettings) -> None:
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
            timeout=cfg.collective_timeout,
        )
        self.p2p = _open_p2p(cfg)
        self.p2p_endpoint: str | None = self.p2p.endpoint if self.p2p else None
        self.host = TransferHost(cfg, self.pool, self.host_pool, self.p2p, self._empty_version)
        self._transports: dict[str, Transport[Any, Any]] = {}

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
        if source.trainer is not None:
            staged = self._stage_from_trainer(source.trainer, part)
        else:
            assert source.path is not None  # `protocol.Source` holds exactly one kind
            roots = [*self.cfg.allowed_root]
            if trusted:
                roots.append(self.cfg.base_checkpoint)
            staged = staging.stage(
                source.path,
                part,
                roots,
                self.expected,
                manifest=source.sha256_manifest,
                pinned=False,
                threads=self.cfg.stage_threads,
                prefault=self.cfg.stage_prefault,
                pool=self.host_pool,
            )
        # Map (and on CUDA pin) it in the rank workers now, off the update's critical path; workers
        # busy with an update map it when it is used.
        try:
            self.pool.share(staged.segments.values(), wait=False)
        except Exception as e:
            log.warning("could not map the staged version in the rank workers yet: %s", e)
        return staged

    def _stage_from_trainer(
        self, source: protocol.TrainerSource, part: protocol.PartSpec | None
    ) -> StagedCheckpoint:
        """One-sided Mooncake reads of this pod's part from the trainer ranks' memory."""
        from hotswap_engine.transport.trainer_source import TrainerUnavailable, stage_from_trainer

        if self.p2p is None:
            raise TrainerUnavailable("this pod cannot read from a trainer: Mooncake did not start")
        return stage_from_trainer(self.p2p, source, part, self.expected, pool=self.host_pool)

    # ---- updates ------------------------------------------------------------------------------

    def transport(self, name: str) -> Transport[Any, Any]:
        """The transport registered as `name` (built on first use, kept for the agent's lifetime)."""
        transport = self._transports.get(name)
        if transport is None:
            transport = self._transports[name] = create_transport(name, self.host)
        return transport

    async def update(
        self, req: protocol.UpdateRequest, staged: StagedCheckpoint | None, rec: UpdateRecord
    ) -> StagedCheckpoint:
        """One update through the transport its mode names (`protocol.UpdateMode` = registry name)."""
        transport = self.transport(req.mode.value)
        return await self._drive(transport, transport.job(req, staged), rec, req.version, req.request_policy)

    async def _drive(
        self,
        transport: Transport[JobT, Any],
        job: JobT,
        rec: UpdateRecord,
        version: str,
        policy: protocol.RequestPolicy,
    ) -> StagedCheckpoint:
        """Connect, transfer, and (for a source that only filled host memory) hand the copy to the
        engine; the record's stages and durations follow."""
        rec.stage = protocol.UpdateStage.CONNECTING
        t0 = time.perf_counter()
        link = await transport.connect(job, rec)
        rec.durations["connect"] = round(time.perf_counter() - t0, 4)
        rec.stage = protocol.UpdateStage.TRANSFERRING
        full = await transport.transfer(link, rec)
        if transport.delivers_to_engine:
            return full
        try:
            await self._apply_alone(version, full, rec, policy)
        except Exception:
            full.release()
            raise
        return full

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
        await self._apply_alone(version or "base", full, rec, protocol.RequestPolicy.KEEP)

    async def _apply_alone(
        self, version: str, full: StagedCheckpoint, rec: UpdateRecord, policy: protocol.RequestPolicy
    ) -> None:
        broadcast = self.transport(protocol.UpdateMode.BROADCAST.value)
        assert isinstance(broadcast, GroupBroadcast)
        job = broadcast.alone(version, full, policy, _free_port(self.cfg.advertise_address))
        out = await self._drive(broadcast, job, rec, version, policy)
        # `full` holds every part, so the transfer filled no new buffer: `out` shares full's buffers
        # and must not be released (that would free the version being served).
        assert out.segments.keys() == full.segments.keys()

    def release_unused(self) -> None:
        """Let the rank workers unmap host buffers the agent freed."""
        self.pool.unmap_closed()

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self.pool.close()
        self.host_pool.clear()
        if self.p2p is not None:
            self.p2p.close()


def _open_p2p(cfg: AgentSettings) -> P2PEndpoint | None:
    """This pod's Mooncake endpoint on its own address; without one the pod still takes broadcasts."""
    from hotswap_engine.transport.p2p import P2PEndpoint, P2PError

    proto: Literal["tcp", "rdma"] = "rdma" if cfg.p2p_protocol == "rdma" else "tcp"
    try:
        return P2PEndpoint(cfg.advertise_address, proto, cfg.p2p_device)
    except P2PError as e:
        log.warning("peer-to-peer disabled: %s", e)
        return None


def _free_port(host: str) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
