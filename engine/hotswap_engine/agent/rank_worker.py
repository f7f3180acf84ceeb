"""A rank worker: the process that owns one GPU of the pod for the collectives.

    python -m hotswap_engine.agent.rank_worker --fd FD --local-rank L --device cuda:L \
        --endpoint ipc:///run/hotswap/handoff-{rank}.sock --bind-host POD_IP [--workers 1]

Started by the agent (`rank_pool.RankPool`), never by hand. It holds what must live on its device:
the process group (`GroupCache`), the broadcast slots and streams (`BroadcastTransport`) and the
hand-off sender its vLLM worker (TP rank = local rank) connects to. The agent's host buffers
(staged parts, full versions) arrive as memfds over the unix socket and are mapped once (pinned
on CUDA) and kept until the agent says `unmap`.

Commands (msgpack maps, see `ranks`): `map`, `unmap`, `prepare`, `group`, `broadcast`, `discard`,
`exit`.
Each gets one `result` answer; `broadcast` sends `progress` events before it. When a failed
NCCL group had to be abandoned (see `process_group.Group.abort`) the worker answers with
`"exiting": true` and exits: the GPU context with a possibly stuck kernel goes with the process,
and the agent starts a new worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Any

import torch
from hotswap_api import protocol
from hotswap_api.rank_messages import (
    BroadcastMsg,
    DiscardMsg,
    ExitMsg,
    GroupMsg,
    MapMsg,
    Message,
    StagedWire,
    UnmapMsg,
)

from hotswap_engine.agent import ranks
from hotswap_engine.handoff import HandoffSender
from hotswap_engine.hostmem import HostBuffer
from hotswap_engine.pacing import Pacer
from hotswap_engine.staging import StagedCheckpoint
from hotswap_engine.transport.broadcast import BroadcastError, BroadcastTransport, make_plan
from hotswap_engine.transport.process_group import GroupCache, GroupError, GroupSpec

log = logging.getLogger("hotswap_engine.agent.rank_worker")

EXIT_ABANDONED = 3  # exit status after an abandoned NCCL group
EXIT_PROTOCOL = 4  # the agent's channel lost its framing (a frame announced beyond MAX_FRAME_BYTES)


class RankWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.local_rank: int = args.local_rank
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.bind_host: str = args.bind_host
        self.timeout: float = args.timeout
        self.groups = GroupCache()
        self.transport = BroadcastTransport(self.device, args.shm_dir)
        endpoint = args.endpoint.replace("{rank}", str(self.local_rank))
        self.sender = HandoffSender(endpoint, args.workers, timeout=args.timeout)
        self.buffers: dict[int, HostBuffer] = {}

    # ---- commands -------------------------------------------------------------------------------

    def handle(self, msg: Message, fds: list[int], sock: socket.socket) -> dict[str, Any]:
        if isinstance(msg, MapMsg):
            return self._map(msg, fds)
        for fd in fds:  # only `map` carries fds
            os.close(fd)
        if isinstance(msg, UnmapMsg):
            for i in msg.ids:
                buffer = self.buffers.pop(i, None)
                if buffer is not None:
                    buffer.close()
            return {"ok": True}
        if isinstance(msg, GroupMsg) and msg.op == "prepare":
            # Asked before `group` on every worker of every member: a worker holding a healthy NCCL
            # group of another membership is replaced by the agent before anyone joins the new one.
            spec, rank = self._spec(msg)
            restart = self.groups.would_abandon(spec, rank, bind_host=self.bind_host, device=self.device)
            return {"ok": True, "restart": restart}
        if isinstance(msg, GroupMsg):
            return self._group(msg)
        if isinstance(msg, BroadcastMsg):
            return self._broadcast(msg, sock)
        if isinstance(msg, DiscardMsg):
            self.groups.discard()
            return {"ok": True}
        # hello, progress and result go from a worker to the agent, never the other way
        raise ranks.ProtocolError(f"`{msg.op}` is not a command")

    def _map(self, msg: MapMsg, fds: list[int]) -> dict[str, Any]:
        if len(msg.buffers) != len(fds):
            for fd in fds:
                os.close(fd)
            raise ranks.ProtocolError(f"{len(msg.buffers)} buffers announced, {len(fds)} fds received")
        t0 = time.perf_counter()
        for spec, fd in zip(msg.buffers, fds, strict=True):
            if spec.id in self.buffers:
                os.close(fd)
                continue
            self.buffers[spec.id] = HostBuffer.from_fd(
                fd, spec.nbytes, spec.capacity, pinned=self.device.type == "cuda"
            )
        return {"ok": True, "seconds": time.perf_counter() - t0}

    def _spec(self, msg: GroupMsg) -> tuple[GroupSpec, int]:
        return GroupSpec(msg.members, msg.master_addr, msg.master_port, msg.backend), msg.rank

    def _group(self, msg: GroupMsg) -> dict[str, Any]:
        spec, rank = self._spec(msg)
        t0 = time.perf_counter()
        try:
            self.groups.get(spec, rank, bind_host=self.bind_host, device=self.device, timeout=self.timeout)
        except Exception as e:
            self.groups.discard()
            return self._failed(f"{type(e).__name__}: {e}")
        return {"ok": True, "seconds": time.perf_counter() - t0}

    def _broadcast(self, msg: BroadcastMsg, sock: socket.socket) -> dict[str, Any]:
        group = self.groups.current
        if group is None or group.broken:
            return self._failed("no process group: `group` must succeed first")
        try:
            staged = self._staged(msg.staged)
            plan, _ = make_plan(staged, 0, fixed=(msg.bucket_bytes, msg.slots))
            split = ranks.split_plan(plan, ranks.parts_from_wire(msg.pod_parts), msg.local)
        except Exception as e:  # a plan that cannot be made touches nothing
            return self._failed(f"cannot plan the update: {type(e).__name__}: {e}")
        # The pod's host buffers under their virtual part names: every virtual part of a real part
        # the pod holds reads from it; the full version's buffers are filled only for the virtual
        # parts this local rank moves (the other local ranks fill the rest of the same buffers).
        virtual = StagedCheckpoint(
            staged.specs, staged.assignment, len(split.plan.parts), {}, staged.alignment
        )
        virtual.segments = {
            v: staged.segments[real] for v, real in split.real_part.items() if real in staged.segments
        }
        try:
            full_out = {p: self.buffers[i] for p, i in msg.full_out.items()}
        except KeyError as e:
            return self._failed(f"cannot plan the update: buffer {e} was never mapped")
        mine = {
            v: full_out[real]
            for v in split.parts_of(self.local_rank)
            if (real := split.real_part[v]) in full_out
        }
        pace = Pacer(msg.max_rate)
        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] > 0.05 or done == split.plan.total_bytes:
                last[0] = now
                ranks.send_message(sock, {"op": "progress", "bytes": done})
            pace.wait(done)

        try:
            stats = self.transport.run(
                group,
                virtual,
                split.plan,
                split.owners,
                self.sender,
                msg.version,
                slots=msg.slots,
                full_out=mine,
                progress=progress,
                op_timeout=msg.op_timeout or self.timeout,
                end=msg.end,
                # On GPUs the full-version device->host copy would share the host links with the
                # host->device copies (61-69% of the bound inline, bench/RESULTS.md): it trails the
                # hand-off instead. Every member of a group runs on the same device type, so the
                # setting is the same on all of them, as the transport requires.
                trail_full=self.device.type == "cuda",
            )
        except (BroadcastError, GroupError) as e:
            self.groups.discard()
            return self._failed(str(e))
        except Exception as e:
            self.groups.discard()
            return self._failed(f"{type(e).__name__}: {e}")
        return {"ok": True, "stats": stats.as_dict()}

    def _staged(self, wire: StagedWire) -> StagedCheckpoint:
        specs = [protocol.TensorSpec(name=n, dtype=d, shape=tuple(s)) for n, d, s in wire.specs]
        try:
            segments = {p: self.buffers[i] for p, i in wire.segments.items()}
        except KeyError as e:
            raise ranks.ProtocolError(f"buffer {e} was never mapped") from None
        return StagedCheckpoint(specs, dict(wire.assignment), wire.part_count, segments, wire.alignment)

    def _failed(self, error: str) -> dict[str, Any]:
        return {
            "ok": False,
            "error": f"rank worker {self.local_rank}: {error}",
            "exiting": self.groups.needs_exit,
        }

    def close(self) -> None:
        self.groups.discard()
        self.transport.close()
        self.sender.close()
        for b in self.buffers.values():
            b.close()
        self.buffers.clear()


def serve(sock: socket.socket, worker: RankWorker) -> int:
    ranks.send_message(
        sock,
        {
            "op": "hello",
            "pid": os.getpid(),
            "local_rank": worker.local_rank,
            "endpoint": worker.sender.endpoint,
            "device": str(worker.device),
        },
    )
    while True:
        try:
            msg, fds = ranks.recv_typed(sock)
        except EOFError:
            log.info("the agent closed the channel: exiting")
            return 0
        except ranks.FrameTooLarge as e:
            # The length itself is garbage: nothing after it can be framed again.
            log.error("rank worker %d: %s; closing the channel", worker.local_rank, e)
            return EXIT_PROTOCOL
        except ranks.ProtocolError as e:
            # A whole frame that is no valid command: refused, and the channel stays in step.
            log.warning("rank worker %d: refused a message: %s", worker.local_rank, e)
            ranks.send_message(sock, {"op": "result", **worker._failed(f"refused: {e}")})
            continue
        if isinstance(msg, ExitMsg):
            ranks.send_message(sock, {"op": "result", "ok": True})
            return 0
        try:
            answer = worker.handle(msg, fds, sock)
        except Exception as e:
            answer = worker._failed(f"{type(e).__name__}: {e}")
        ranks.send_message(sock, {"op": "result", **answer})
        if worker.groups.needs_exit:
            log.error("rank worker %d: NCCL group abandoned, exiting", worker.local_rank)
            return EXIT_ABANDONED


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hotswap_engine.agent.rank_worker")
    p.add_argument("--fd", type=int, required=True, help="the agent's end of a unix socketpair")
    p.add_argument("--local-rank", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--endpoint", required=True, help="hand-off endpoint; `{rank}` becomes the local rank")
    p.add_argument("--workers", type=int, default=1, help="vLLM workers this sender serves")
    p.add_argument("--bind-host", required=True)
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank-worker-{args.local_rank}: %(message)s"
    )
    sock = socket.socket(fileno=args.fd)
    worker = RankWorker(args)
    code = 1
    try:
        code = serve(sock, worker)
    finally:
        if code == EXIT_ABANDONED:
            # No destructor may touch the abandoned NCCL communicator: leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        worker.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
