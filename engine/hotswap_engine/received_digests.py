"""Fleet verification, level (a): did each worker receive exactly the bytes of the version?

Each vLLM worker can fingerprint (hotswap_engine.digest) every whole tensor as it arrives over the
hand-off, before vLLM processes it (`/apply` with `"digests": true`; the fingerprints come back as
`received` in each worker's result). Compared here with the version's per-tensor fingerprints (its
manifest), this catches storage or transfer corruption in the bytes a pod applied. Every TP worker
receives whole tensors, so every rank must match the manifest in full.

Pure and torch-free: the agent (and tests) call it on JSON they already hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mismatch:
    rank: int | None
    tensor: str
    expected: str | None  # None: the tensor is not in the manifest
    received: str | None  # None: the worker did not receive it

    def __str__(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "a worker"
        if self.received is None:
            return f"{who}: {self.tensor}: not received"
        if self.expected is None:
            return f"{who}: {self.tensor}: received but not in the manifest"
        return f"{who}: {self.tensor}: received {self.received}, the manifest has {self.expected}"


def mismatches(expected: Mapping[str, str], workers: Sequence[Mapping[str, Any]]) -> list[Mismatch]:
    """Every difference between the manifest's fingerprints and what each worker reports it received
    (`workers`: /apply's per-worker results, each with `rank` and `received`). A worker without
    `received` (digests not requested) is an error too: nothing was verified for it."""
    out: list[Mismatch] = []
    for worker in workers:
        rank = worker.get("rank")
        rank = rank if isinstance(rank, int) else None
        received = worker.get("received")
        if not isinstance(received, Mapping):
            out.append(Mismatch(rank, "*", None, None))
            continue
        for name in sorted(set(expected) | set(received)):
            want, got = expected.get(name), received.get(name)
            if want != got:
                out.append(Mismatch(rank, name, want, got))
    return out
