"""The agent's settings: command-line flags with environment fall-backs.

Every address is explicit configuration (tests set loopback ones); nothing is autodetected.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AgentConfig:
    pod_name: str
    host: str
    port: int
    token: str
    base_checkpoint: Path  # what the served model was built from: the schema every version must match
    allowed_roots: tuple[Path, ...]
    control_socket: Path  # the launcher's private channel in the inference container
    handoff_endpoint: str  # ZeroMQ endpoint the vLLM workers connect to
    workers: int = 1  # vLLM workers (tensor-parallel ranks) that take part in every hand-off
    device: str = "cpu"  # "cpu", or "cuda" for one rank worker per local GPU
    shm_dir: Path = Path("/dev/shm")  # where CPU hand-off slots live (shared with the inference container)
    # Address other members use to reach this pod's process-group rank; the pod IP.
    advertise_address: str = "127.0.0.1"
    p2p_protocol: str = "tcp"  # Mooncake protocol: "tcp" in tests, "rdma" in production
    p2p_device: str = ""  # RDMA device names for Mooncake; empty for tcp
    collective_timeout_s: float = 60.0  # a dead group member surfaces within this bound
    # Rank workers (one process per local GPU, cuda:0..N-1; on CPU gloo processes). None: every
    # GPU of the container on cuda, 1 on cpu. Every pod of a group must run the same number.
    gpus: int | None = None
    # The longest a status long-poll is held open, whatever the client asks for (tests shorten it).
    max_status_wait_s: float = 60.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def local_ranks(self) -> int:
        if self.gpus is not None:
            return self.gpus
        if self.device == "cuda":
            import torch

            return max(torch.cuda.device_count(), 1)
        return 1

    @property
    def rank_endpoint(self) -> str:
        """The hand-off endpoint with `{rank}` (each rank worker binds its own) when there are several."""
        return rank_endpoint(self.handoff_endpoint, self.local_ranks)


def rank_endpoint(endpoint: str, local: int) -> str:
    """`endpoint` for `local` rank workers: unchanged for one or when it has `{rank}` already; an
    ipc path gets `-{rank}` before its extension (tcp endpoints must carry `{rank}` themselves)."""
    if local == 1 or "{rank}" in endpoint:
        return endpoint
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"with {local} rank workers the hand-off endpoint needs `{{rank}}`: {endpoint}")
    head, dot, ext = endpoint.rpartition(".")
    if dot and "/" not in ext:
        return f"{head}-{{rank}}.{ext}"
    return f"{endpoint}-{{rank}}"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    p = argparse.ArgumentParser(prog="python -m hotswap_engine.agent", description=__doc__)
    p.add_argument("--pod-name", default=_env("POD_NAME", "local"))
    p.add_argument("--host", default=_env("POD_IP"), help="bind address (the pod IP); required")
    p.add_argument("--port", type=int, default=int(_env("HOTSWAP_AGENT_PORT", "8600") or 8600))
    p.add_argument(
        "--token-file",
        default=_env("HOTSWAP_AGENT_TOKEN_FILE"),
        help="file holding the bearer token (or set HOTSWAP_AGENT_TOKEN)",
    )
    p.add_argument("--base-checkpoint", required=True)
    p.add_argument("--allowed-root", action="append", required=True, dest="allowed_roots")
    p.add_argument("--control-socket", default="/run/hotswap/control.sock")
    p.add_argument("--handoff-endpoint", default="ipc:///run/hotswap/handoff.sock")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--advertise-address", default=None, help="defaults to --host")
    p.add_argument("--p2p-protocol", choices=["tcp", "rdma"], default="tcp")
    p.add_argument("--p2p-device", default="")
    p.add_argument("--collective-timeout", type=float, default=60.0)
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="rank workers, one per local GPU (default: all GPUs of the container on cuda, 1 on cpu)",
    )
    p.add_argument(
        "--max-status-wait",
        type=float,
        default=60.0,
        help="seconds: the longest a GET /v1/status long-poll is held open (capped at 60)",
    )
    a = p.parse_args(argv)
    if not 0 < a.max_status_wait <= 60:
        p.error("--max-status-wait must be in (0, 60]")
    if a.gpus is not None and a.gpus < 1:
        p.error("--gpus must be at least 1")
    if a.gpus is not None and a.gpus > 1:
        try:
            rank_endpoint(a.handoff_endpoint, a.gpus)
        except ValueError as e:
            p.error(str(e))
    if not a.host:
        p.error("--host (or POD_IP) is required: the agent never guesses its address")
    token = _env("HOTSWAP_AGENT_TOKEN")
    if a.token_file:
        token = Path(a.token_file).read_text().strip()
    if not token:
        p.error("a bearer token is required: --token-file or HOTSWAP_AGENT_TOKEN")
    return AgentConfig(
        pod_name=a.pod_name,
        host=a.host,
        port=a.port,
        token=token,
        base_checkpoint=Path(a.base_checkpoint),
        allowed_roots=tuple(Path(r) for r in a.allowed_roots),
        control_socket=Path(a.control_socket),
        handoff_endpoint=a.handoff_endpoint,
        workers=a.workers,
        device=a.device,
        shm_dir=Path(a.shm_dir),
        advertise_address=a.advertise_address or a.host,
        p2p_protocol=a.p2p_protocol,
        p2p_device=a.p2p_device,
        collective_timeout_s=a.collective_timeout,
        gpus=a.gpus,
        max_status_wait_s=a.max_status_wait,
    )
