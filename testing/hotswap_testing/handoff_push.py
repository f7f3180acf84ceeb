"""Sending a set of in-memory tensors through a HandoffSender without a broadcast in between.

Used by tests and the self-check (`handoff_selftest`), and as the reference for what the transfer
pipeline does per bucket (wait for the slot, fill it, announce it). The agent plans buckets with
`hotswap_engine.buckets`; the packing here is deliberately naive (in order, chunks for big tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hotswap_engine.handoff import DTYPE_CODES, Entry, HandoffSender, Slot

# A bucket: entries plus, for each, the source bytes (1-D uint8) that go to `entry.offset`.
Bucket = list[tuple[Entry, torch.Tensor]]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_naive(
    tensors: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int, alignment: int = 64
) -> list[Bucket]:
    if bucket_bytes <= 0 or bucket_bytes % alignment:
        raise ValueError("bucket_bytes must be a positive multiple of alignment")
    buckets: list[Bucket] = [[]]
    used = 0
    for name, t in tensors:
        raw = tensor_bytes(t)
        total = raw.numel()
        dtype, shape = DTYPE_CODES[t.dtype], tuple(t.shape)
        done = 0
        while True:
            if used >= bucket_bytes:
                buckets.append([])
                used = 0
            n = min(total - done, bucket_bytes - used)
            entry = Entry(name, dtype, shape, used, n, done, total)
            buckets[-1].append((entry, raw[done : done + n]))
            used = -(-(used + n) // alignment) * alignment
            done += n
            if done >= total:
                break
    return [b for b in buckets if b]


def push_tensors(
    sender: HandoffSender,
    version: str,
    slots: Sequence[Slot],
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    end: bool = True,
) -> int:
    """begin, every bucket round-robin through the slots, end (waits for the workers' done).
    Returns the number of buckets sent."""
    size = min(s.nbytes for s in slots)
    buckets = pack_naive(tensors, size - size % 64)
    sender.begin(version, slots)
    for i, bucket in enumerate(buckets):
        index = i % len(slots)
        sender.wait_slot_free(index)
        send_bucket(sender, slots[index], index, bucket)
    if end:
        sender.end()
    return len(buckets)


def send_bucket(sender: HandoffSender, slot: Slot, index: int, bucket: Bucket) -> int:
    ready = None
    for entry, src in bucket:
        slot.tensor[entry.offset : entry.offset + entry.nbytes].copy_(src, non_blocking=slot.tensor.is_cuda)
    if slot.tensor.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return sender.send_bucket(index, [e for e, _ in bucket], ready)
