"""What the agent lends its transports: one object, built once by the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hotswap_engine.agent.rank_pool import RankPool
    from hotswap_engine.agent.settings import AgentSettings
    from hotswap_engine.hostmem import HostBufferPool
    from hotswap_engine.staging import StagedCheckpoint
    from hotswap_engine.transport.p2p import P2PEndpoint


@dataclass(frozen=True)
class TransferHost:
    cfg: AgentSettings
    pool: RankPool  # the rank workers: one per local GPU, they run the collectives
    host_pool: HostBufferPool  # host buffers reused across versions (full versions, p2p targets)
    p2p: P2PEndpoint | None  # this pod's Mooncake endpoint; None when it did not start
    empty_version: Callable[[], StagedCheckpoint]  # a host buffer laid out for the whole model
