"""Fleet verification of the weights a pod applied (#12 item 3), the agent's half.

After every update the agent checks two things and reports them in its status (`WeightsCheck`):

(a) received bytes: every vLLM worker fingerprinted each tensor as it came off the hand-off (`/apply`
    with digests); they must equal the version's manifest. A trainer-published version carries its
    per-tensor fingerprints (the manifest its checksum covers), so storage or transfer corruption
    anywhere between the trainer and vLLM is caught. A path source has only file-level sha256
    manifests (checked at staging), so the expected values are those of the agent's host copy, the
    bytes it handed off: this catches corruption between the host copy and the vLLM workers.
(b) processed parameters: vLLM's `compute_weight_checksums` after the update. Whether they are right
    can only be told by comparison: the operator compares them across the pool's pods.

A pod that fails (a) reports itself not ready (its readiness probe fails) and the operator keeps its
readiness gate False; (b) is decided by the operator alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hotswap_api import protocol
from hotswap_api.resources import MAX_REPORTED_TENSORS

from hotswap_engine import launcher_client, received_digests

if TYPE_CHECKING:
    from hotswap_engine.staging import StagedCheckpoint

log = logging.getLogger(__name__)

PROCESSED_SHORT_HEX = 16


def manifest_of(source: protocol.Source | None) -> dict[str, str] | None:
    """The version's own per-tensor fingerprints, where its source has them (a trainer's manifest)."""
    if source is None or source.trainer is None:
        return None
    return {t.name: t.fingerprint for t in source.trainer.tensors}


def host_fingerprints(full: StagedCheckpoint) -> dict[str, str]:
    """Fingerprints of the complete host copy the agent handed off (blocking)."""
    from hotswap_engine.digest import fingerprint

    return {name: fingerprint(view) for name, view in full.iter_views()}


def processed_digest(workers: Sequence[Mapping[str, str]]) -> tuple[str, dict[str, str]]:
    """One sha256 over every worker's checksums, and the per-tensor values shortened for reporting."""
    merged: dict[str, str] = {}
    for worker in workers:
        merged.update(worker)
    blob = json.dumps(sorted(merged.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest(), {k: v[:PROCESSED_SHORT_HEX] for k, v in merged.items()}


def received_check(
    version: str, expected: Mapping[str, str], workers: Sequence[Mapping[str, Any]]
) -> protocol.WeightsCheck:
    found = received_digests.mismatches(expected, workers)
    for m in found[:MAX_REPORTED_TENSORS]:
        log.error("weights check of %s: %s", version, m)
    return protocol.WeightsCheck(
        version=version,
        received_ok=not found,
        received_mismatches=tuple(
            protocol.TensorMismatch(tensor=m.tensor, rank=m.rank, detail=str(m))
            for m in found[:MAX_REPORTED_TENSORS]
        ),
        received_count=len(found),
    )


async def check_weights(
    control_socket: str,
    version: str,
    source: protocol.Source | None,
    full: StagedCheckpoint,
    workers: Sequence[Mapping[str, Any]],
) -> protocol.WeightsCheck:
    """Both levels for the version just applied; `workers` are /apply's per-worker results. The
    expected fingerprints (a host copy's, for a path source) and vLLM's checksums run side by side."""

    async def expected_check() -> tuple[protocol.WeightsCheck, float]:
        t0 = time.perf_counter()
        expected = manifest_of(source)
        if expected is None:
            expected = await asyncio.to_thread(host_fingerprints, full)
        return received_check(version, expected, workers), time.perf_counter() - t0

    async def processed() -> tuple[str | None, dict[str, str], float]:
        t0 = time.perf_counter()
        try:
            digest, short = processed_digest(await launcher_client.checksums(control_socket))
        except launcher_client.LauncherUnreachable as e:
            # Level (b) is then unknown for this pod: the operator compares only the pods that have it.
            log.warning("vLLM's weight checksums of %s are unavailable: %s", version, e)
            digest, short = None, {}
        return digest, short, time.perf_counter() - t0

    (check, t_expected), (digest, short, t_processed) = await asyncio.gather(expected_check(), processed())
    seconds = {"expected": round(t_expected, 4), "processed": round(t_processed, 4)}
    return check.model_copy(update={"processed_digest": digest, "processed": short, "seconds": seconds})


def describe(check: protocol.WeightsCheck) -> str:
    """For last_error and logs: which tensors a failed check names."""
    shown = "; ".join(m.detail or m.tensor for m in check.received_mismatches)
    more = check.received_count - len(check.received_mismatches)
    return f"the weights of {check.version} failed verification ({check.received_count} tensor(s)): " + (
        shown + (f"; {more} more" if more > 0 else "")
    )
