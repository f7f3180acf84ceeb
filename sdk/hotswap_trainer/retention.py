"""Which published versions a trainer may let go of: a pure decision, on the versions' phases.

A version's memory is what the agents read while they stage it, so it is kept until a newer version
is Complete on every replica (by then every pod serves the newer one, and a pod added later catches
up from its peers). A Failed or Superseded version (no pod will read it any more) and one whose
WeightVersion is gone go at once. When the trainer holds its cap of versions and needs room for one
more, the oldest one that is Complete makes room too: its pods hold it, so nobody needs the trainer's
copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

COMPLETE = "Complete"
DONE_WITHOUT_READERS = ("Failed", "Superseded")


def releasable(
    held: Sequence[str], phases: Mapping[str, str | None], *, need_room: bool, cap: int
) -> list[str]:
    """The versions to release, oldest first.

    `held`: the versions the trainer holds, in publish order; `phases`: each one's WeightVersion
    phase (None: the WeightVersion does not exist any more; absent: unknown, kept); `need_room`: one
    more version is about to be published, and `cap` is how many the trainer may hold.
    """
    release: list[str] = []
    newest_complete = max((i for i, v in enumerate(held) if phases.get(v) == COMPLETE), default=-1)
    for i, v in enumerate(held):
        if v not in phases:  # its phase could not be read: kept, to be safe
            continue
        phase = phases[v]
        if i < newest_complete or phase is None or phase in DONE_WITHOUT_READERS:
            release.append(v)
    kept = [v for v in held if v not in release]
    if need_room and len(kept) >= cap:
        oldest_complete = next((v for v in kept if phases.get(v) == COMPLETE), None)
        if oldest_complete is not None:
            release.append(oldest_complete)
    return [v for v in held if v in release]
