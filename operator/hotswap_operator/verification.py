"""Fleet verification (#12 item 3), the operator's half: which pods' weights failed verification.

Pure, like the planner that calls it. Two levels, from what each agent reports of the version it
serves (`protocol.WeightsCheck`):

- `Received`: the pod's own check failed (a vLLM worker received bytes other than the version's
  manifest). The agent says so itself; the operator only names pod and tensors.
- `Processed`: vLLM's checksums of the processed parameters are compared across the pods that serve
  the same version (and passed the first level). Replicas of one pool share hardware and
  configuration, so they must agree: a pod outside the strict majority is the odd one. Without a
  strict majority (two pods, one each) nothing says which is wrong: that is reported, not gated.

A pod named here has its readiness gate False (out of traffic) and is listed in the WeightVersion's
`status.verification`, with an Event when it first appears there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hotswap_api import protocol
from hotswap_api.resources import MAX_REPORTED_TENSORS, PodVerification, VerificationLevel


@dataclass(frozen=True)
class Checked:
    """A live pod's agent report of the version it serves (the planner's PodView, narrowed)."""

    pod: str
    serving: str | None
    check: protocol.WeightsCheck | None


@dataclass
class Verdict:
    failed: dict[str, PodVerification] = field(default_factory=dict)  # by pod name
    notes: list[str] = field(default_factory=list)  # disagreements without a majority


def verdict(pods: Iterable[Checked]) -> Verdict:
    out = Verdict()
    compared: dict[str, list[tuple[str, protocol.WeightsCheck]]] = {}
    for p in pods:
        check = p.check
        if check is None or p.serving is None or check.version != p.serving:
            continue  # nothing verified for what it serves (a rollback, the base checkpoint)
        if not check.received_ok:
            out.failed[p.pod] = _received(p.pod, check)
        elif check.processed_digest is not None:
            compared.setdefault(check.version, []).append((p.pod, check))
    for version, group in sorted(compared.items()):
        _compare(version, group, out)
    return out


def _received(pod: str, check: protocol.WeightsCheck) -> PodVerification:
    tensors = list(dict.fromkeys(m.tensor for m in check.received_mismatches))[:MAX_REPORTED_TENSORS]
    return PodVerification(
        pod=pod,
        version=check.version,
        level=VerificationLevel.RECEIVED,
        tensors=tensors,
        message=(
            f"pod {pod} received {check.received_count} tensor(s) of {check.version} with bytes other "
            f"than the version's manifest: {', '.join(tensors)}"
        ),
    )


def _compare(version: str, group: Sequence[tuple[str, protocol.WeightsCheck]], out: Verdict) -> None:
    counts = Counter(c.processed_digest for _, c in group)
    if len(counts) < 2:
        return
    (top, n), (_, second) = counts.most_common(2)
    if n == second:
        pods = ", ".join(sorted(p for p, _ in group))
        out.notes.append(f"pods {pods} disagree on the processed weights of {version} with no majority")
        return
    reference = next(c for _, c in group if c.processed_digest == top)
    for pod, c in group:
        if c.processed_digest == top:
            continue
        keys = set(reference.processed) | set(c.processed)
        differ = sorted(k for k in keys if reference.processed.get(k) != c.processed.get(k))
        shown = differ[:MAX_REPORTED_TENSORS]
        out.failed[pod] = PodVerification(
            pod=pod,
            version=version,
            level=VerificationLevel.PROCESSED,
            tensors=shown,
            message=(
                f"vLLM's checksums of pod {pod}'s processed weights of {version} differ from those of "
                f"{n} of the {len(group)} pods serving it, in {len(differ)} tensor(s): {', '.join(shown)}"
            ),
        )
