"""Bytes across the trainer's torch.distributed group, without pickle (`all_gather_object` unpickles
what other ranks send): lengths first, then the payloads padded to the longest, as uint8 tensors.

The payloads are JSON (`memory.PartDescriptor.encode`), so a rank only ever parses data."""

from __future__ import annotations

from typing import Any

import torch


def _device(group: Any) -> torch.device:
    """NCCL moves only GPU tensors; every other backend here takes CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_bytes(payload: bytes, group: Any = None) -> list[bytes]:
    """Every rank's `payload`, in rank order (a collective: every rank of `group` calls it)."""
    import torch.distributed as dist

    device = _device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    longest = max(max(lengths), 1)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths, strict=True)]


def broadcast_bytes(payload: bytes, src: int = 0, group: Any = None) -> bytes:
    """`payload` of rank `src` on every rank (others pass anything, e.g. b"")."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    gathered = all_gather_bytes(payload if rank == src else b"", group)
    return gathered[src]
