"""Leader election on a coordination.k8s.io Lease, so two operator replicas never act at once.

The same rules as client-go's leader election: a replica takes the Lease when it is free or when its
record (holder, renewTime) has not changed for `leaseDurationSeconds` *as measured on this replica's
own clock since it first saw that record* — so clock skew between nodes cannot make a live leader look
expired. Writes are optimistic (the resourceVersion read), so of two replicas racing for an expired
Lease exactly one wins. The leader renews every duration/3; a leader that cannot renew within the
duration stops acting (the process exits and its Deployment restarts it as a follower).

`decide` is the pure part; `LeaderElector` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hotswap_operator.kube import Kube, is_conflict

log = logging.getLogger(__name__)
Obj = dict[str, Any]


def micro_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Observed:
    """The Lease record as this replica last saw it, and when (monotonic seconds) it first saw it."""

    record: tuple[str | None, str | None]  # holderIdentity, renewTime
    since: float


@dataclass(frozen=True)
class Decision:
    action: str  # "create", "renew", "take" or "wait"
    body: Obj | None  # the Lease to write (None for "wait")
    observed: Observed | None


def decide(
    lease: Obj | None,
    me: str,
    namespace: str,
    name: str,
    duration_s: int,
    now: datetime,
    mono: float,
    observed: Observed | None,
) -> Decision:
    if lease is None:
        fresh: Obj = {
            "holderIdentity": me,
            "leaseDurationSeconds": duration_s,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": 0,
        }
        body: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": fresh,
        }
        return Decision("create", body, None)
    spec: Obj = dict(lease.get("spec") or {})
    record: tuple[str | None, str | None] = (spec.get("holderIdentity"), spec.get("renewTime"))
    if observed is None or observed.record != record:
        observed = Observed(record, mono)
    holder = spec.get("holderIdentity")
    body = {k: v for k, v in lease.items() if k != "status"}  # as read: keeps the resourceVersion
    if holder == me:
        spec["renewTime"] = micro_time(now)
        spec["leaseDurationSeconds"] = duration_s
        return Decision("renew", {**body, "spec": spec}, observed)
    their_duration = int(spec.get("leaseDurationSeconds") or duration_s)
    if holder and mono - observed.since < their_duration:
        return Decision("wait", None, observed)
    spec.update(
        holderIdentity=me,
        leaseDurationSeconds=duration_s,
        acquireTime=micro_time(now),
        renewTime=micro_time(now),
        leaseTransitions=int(spec.get("leaseTransitions") or 0) + (1 if holder else 0),
    )
    return Decision("take", {**body, "spec": spec}, observed)


class LeadershipLost(RuntimeError):
    pass


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, me: str, duration_s: int = 15) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.me = me
        self.duration_s = duration_s
        self._observed: Observed | None = None
        self._last_renew = 0.0
        self._waiting_for: str | None = None  # the holder last logged as leading while we wait

    async def _try(self) -> bool:
        lease = await self.kube.get_lease(self.namespace, self.name)
        d = decide(
            lease,
            self.me,
            self.namespace,
            self.name,
            self.duration_s,
            datetime.now(UTC),
            time.monotonic(),
            self._observed,
        )
        self._observed = d.observed
        if d.body is None:
            holder = d.observed.record[0] if d.observed else None
            if holder != self._waiting_for:  # once per holder: which replica leads, seen from here
                log.info("%s: lease %s/%s is held by %s; waiting", self.me, self.namespace, self.name, holder)
                self._waiting_for = holder
            return False
        try:
            if d.action == "create":
                await self.kube.create_lease(self.namespace, d.body)
            else:
                await self.kube.replace_lease(self.namespace, self.name, d.body)
        except Exception as e:
            if is_conflict(e):
                return False  # another replica wrote first; look again
            raise
        if d.action != "renew":
            log.info("%s: took lease %s/%s (%s)", self.me, self.namespace, self.name, d.action)
        self._last_renew = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        while True:
            try:
                if await self._try():
                    return
            except Exception as e:  # the apiserver may be briefly away; keep trying
                log.warning("lease %s: %s", self.name, e)
            await asyncio.sleep(max(1.0, self.duration_s / 5))

    async def hold(self) -> None:
        """Renew until renewal fails for a whole lease duration; then raise LeadershipLost."""
        while True:
            await asyncio.sleep(self.duration_s / 3)
            try:
                if not await self._try():
                    raise LeadershipLost(f"{self.me} lost lease {self.name} to another replica")
            except LeadershipLost:
                raise
            except Exception as e:
                log.warning("renewing lease %s: %s", self.name, e)
            if time.monotonic() - self._last_renew > self.duration_s:
                raise LeadershipLost(f"{self.me} could not renew lease {self.name} for {self.duration_s}s")
