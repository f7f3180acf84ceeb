"""The operator's decisions, as a pure function of a fleet snapshot: no I/O, no kopf, no clock.

`plan(fleet, failures)` looks at one InferencePool — its spec and status, its pods (phase, IP, what
their agents report) and its WeightVersions (spec and status) — and answers with a `Plan`: the actions
to run (stage, update, drop, label a pod, set its readiness gate, emit an event), the statuses to write
and when to look again. Handlers execute plans; they decide nothing.

Every fact a rollout needs between two looks lives in the API (the WeightVersion's `status.rollout`:
attempt, group, port; the pool's `status.currentVersion`/`currentSource`) or in the agents' own
status, so a restarted operator plans exactly what the previous one would have: the rollout resumes.

The rules, in the order `plan` applies them:
1. The newest WeightVersion of the pool is the target; older ones still in progress become
   Superseded. Newest means created last: each version is numbered (`status.sequence`) when first
   seen, versions seen together in the order they were created (`resources.version_order`).
2. The target's rollout: Pending → Staging (the broadcast group is every healthy pod, whatever it
   serves: a broadcast replaces all weights, and a failure rolls each member back to what it served;
   member i stages part i of n) → Updating (every member gets the group, the master
   is rank 0's IP) → Complete (the pool's currentVersion follows). A member lost or failed ends the
   attempt: a new group is formed until `updatePolicy.maxAttempts`, then Failed. A checkpoint that
   is missing or does not match fails at once (agents stage before anything is applied, so every pod
   keeps serving the old weights); so does an update an agent refuses with a permanent error or
   reports Failed with a permanent `error_code` (reason UpdateRejected). The deadline is
   `spec.timeout` from the start.
3. Catch-up (only while no broadcast is running): a pod that does not serve the current version
   (a pod added by scale-out, or one that restarted) reads it peer-to-peer from the healthy pods that
   serve it and publish it (one-sided Mooncake reads of their staged host memory: they keep serving
   and do no work), and applies it alone. Without such a holder, with `p2p_catch_up` off, or right
   after its last p2p attempt at this version failed (e.g. every holder went away mid-transfer), it
   stages the version from the WeightVersion's source instead; after a failed storage attempt the
   usual backoff applies and p2p may be tried again.
   A pod added while a broadcast is Staging or Updating does not join it: the group is fixed when
   staging starts (each member stages part i of n), and admitting a member would restart the
   collective rendezvous (NCCL communicator) of every member. It stays out of traffic (its readiness
   gate is False, it serves an older version) and catches up to the rollout's target once the rollout
   is Complete and that version is the pool's current one.
4. Pods: the label `hotswap.dev/weight-version` says what the agent serves; the readiness gate is
   True only when that is the pool's current version and its weights passed verification
   (`verification`: the bytes received against the version's manifest, vLLM's checksums of the
   processed weights against the pool's other pods). A pod that failed is listed in the
   WeightVersion's `status.verification` and an Event names it.
5. History: finished WeightVersions beyond `spec.versionHistoryLimit` are deleted, oldest first
   (`prune_versions`); the pods hold staged copies only of the current version and of one in
   progress, so a pruned version's host memory is dropped already (`DropStaged`).

`Fleet.versions` need not hold every version: the operator passes the window of the history these
rules can act on (`history.window`) and counts the finished versions it left out in
`Fleet.hidden_history`; the plan is the same as over every version (a property test).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cached_property

from hotswap_api import protocol
from hotswap_api.labels import BASE_VERSION, POOL_LABEL
from hotswap_api.resources import (
    Condition,
    ConditionStatus,
    InferencePoolSpec,
    InferencePoolStatus,
    Phase,
    PodVerification,
    RolloutMember,
    RolloutState,
    SourceRef,
    StageDurations,
    Strategy,
    WeightVersionSpec,
    WeightVersionStatus,
    parse_duration,
    parse_quantity,
    version_order,
)

from hotswap_operator import verification
from hotswap_operator.settings import PlannerConfig

# ---- the snapshot --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    name: str
    ip: str | None
    created: datetime
    running: bool  # phase Running
    deleting: bool  # deletionTimestamp set
    ready: bool  # the pod's Ready condition (which includes our readiness gate)
    gate: bool | None  # the hotswap.dev/weights-ready condition; None: not written yet
    label_version: str | None  # the hotswap.dev/weight-version label
    agent: protocol.AgentStatus | None  # None: the agent did not answer
    gate_reason: str | None = None  # the gate condition's reason (None: not known)

    @property
    def live(self) -> bool:
        return not self.deleting

    @property
    def serving(self) -> str | None:
        """The version the agent serves; None: the base checkpoint (or unknown when agent is None)."""
        return _norm(self.agent.serving_version) if self.agent else None

    @property
    def busy(self) -> bool:
        return self.agent is not None and self.agent.update is not None and not self.agent.update.done

    @property
    def healthy(self) -> bool:
        """Reachable, running, engine up, serving a fully applied version, nothing in progress."""
        return (
            self.running
            and not self.deleting
            and bool(self.ip)
            and self.agent is not None
            and self.agent.ready
            and self.agent.engine_up
            and not self.busy
        )


@dataclass(frozen=True)
class VersionView:
    name: str
    created: datetime
    generation: int
    spec: WeightVersionSpec
    status: WeightVersionStatus
    resource_version: str = ""  # metadata.resourceVersion (orders versions first seen together)
    uid: str = ""  # metadata.uid (a delete must not hit an object created again under the same name)

    @cached_property
    def order(self) -> tuple[object, ...]:
        """Its sort key (`resources.version_order`), computed once per view: the operator's view cache
        keeps views of unchanged objects, so a pool with 1,000 versions in its history does not
        rebuild 1,000 keys twice per reconcile."""
        return version_order(self.status.sequence, self.created, self.resource_version, self.spec.version)


@dataclass(frozen=True)
class Fleet:
    pool: str
    generation: int
    spec: InferencePoolSpec
    status: InferencePoolStatus
    pods: tuple[PodView, ...]
    versions: tuple[VersionView, ...]  # the WeightVersions whose poolRef is this pool
    now: datetime
    # Finished, unprotected versions of the history left out of `versions` (`history.window`: none
    # of them can be acted on, all are newer than any version the limit prunes); they count toward
    # the pool's versionHistoryLimit.
    hidden_history: int = 0


@dataclass(frozen=True)
class ActionFailure:
    """A Stage or update an agent refused or that failed. The controller keeps it, fed into every plan,
    until the same action succeeds: a permanent one fails the rollout (or holds a catch-up), any other
    is retried after `backoff_s(attempts)`, and its message shows in the WeightVersion's status."""

    pod: str
    version: str
    message: str
    permanent: bool  # the checkpoint is missing/invalid/forbidden: retrying cannot help
    at: datetime  # when the latest attempt failed
    attempts: int = 1  # consecutive failed attempts
    source: protocol.Source | None = None  # what the Stage asked for (None: a StartUpdate)


# Planned a little after a due time, so that the deadline has passed (`now > deadline`) by then.
DUE_SLACK_S = 0.05


# ---- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    pod: str
    endpoint: str
    request: protocol.StageRequest


@dataclass(frozen=True)
class StartUpdate:
    pod: str
    endpoint: str
    request: protocol.UpdateRequest


@dataclass(frozen=True)
class DropStaged:
    pod: str
    endpoint: str
    version: str


@dataclass(frozen=True)
class SyncPod:
    """Bring a pod's label and readiness-gate condition in line (None: leave that one alone)."""

    pod: str
    version_label: str | None = None
    gate: bool | None = None
    gate_reason: str = ""
    gate_message: str = ""


@dataclass(frozen=True)
class Emit:
    """A Kubernetes Event on a WeightVersion (kind "WeightVersion") or on the pool."""

    kind: str
    name: str
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class PrunedVersion:
    name: str
    uid: str
    version: str


@dataclass(frozen=True)
class PruneVersions:
    """Delete these WeightVersions (beyond the pool's spec.versionHistoryLimit, oldest first) and say so
    in one Event on the pool. A version already gone (or created again: another uid) is skipped."""

    versions: tuple[PrunedVersion, ...]
    limit: int


Action = Stage | StartUpdate | DropStaged | SyncPod | Emit | PruneVersions


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    version_statuses: dict[str, WeightVersionStatus]  # only those that changed, by object name
    pool_status: InferencePoolStatus
    requeue_after: float


# ---- helpers -------------------------------------------------------------------------------------------


def _norm(version: str | None) -> str | None:
    return None if version in (None, "", BASE_VERSION) else version


def _label(version: str | None) -> str:
    return version or BASE_VERSION


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """A copy of `conditions` with `type_` set; its lastTransitionTime moves only when status changes."""
    value = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    new = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: c.type)


def condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def backoff_s(attempts: int, config: PlannerConfig) -> float:
    """Seconds to wait after the `attempts`-th consecutive failure of an action: exponential, capped."""
    return min(config.action_backoff_max, config.action_backoff_base * 2 ** max(0, attempts - 1))


def _order(v: VersionView) -> tuple[object, ...]:
    return v.order


def _numbered(r: _Round, versions: Iterable[VersionView]) -> list[VersionView]:
    """The pool's versions oldest first, each with its `status.sequence` (rule 1): a version seen for
    the first time gets the next number, recorded with the statuses this plan writes."""
    ordered = sorted(versions, key=_order)
    top = max((v.status.sequence or 0 for v in ordered), default=0)
    out: list[VersionView] = []
    for v in ordered:
        if v.status.sequence is None:
            top += 1
            v = replace(v, status=v.status.model_copy(update={"sequence": top}, deep=True))
            r.statuses[v.name] = v.status
        out.append(v)
    return out


@dataclass
class _Round:
    """Mutable scratch space of one `plan` call."""

    fleet: Fleet
    config: PlannerConfig
    failures: Sequence[ActionFailure]
    actions: list[Action] = field(default_factory=list)
    statuses: dict[str, WeightVersionStatus] = field(default_factory=dict)
    current: str | None = None
    current_source: SourceRef | None = None
    degraded: list[str] = field(default_factory=list)  # catch-ups that fail
    disagreements: list[str] = field(default_factory=list)  # pods' processed weights, no majority
    active: bool = False  # work is in progress: look again soon
    wake_in: float | None = None  # seconds until a timed decision is due (a backoff ends, a deadline)
    # Indices built once per plan: `pod` and `failure` are asked per group member, and a scan of the
    # fleet each time made a plan O(pods^2) (40,000 comparisons per look at 200 pods).
    _pods: dict[str, PodView] = field(init=False, repr=False)
    _failures: dict[tuple[str, str], list[ActionFailure]] = field(init=False, repr=False)
    _holders: dict[str | None, tuple[protocol.PeerPart, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pods = {p.name: p for p in self.fleet.pods}
        self._failures = {}
        self._holders = {}
        for f in self.failures:
            self._failures.setdefault((f.pod, f.version), []).append(f)

    def due_in(self, seconds: float) -> None:
        """Something this plan decided changes after `seconds` with no event: plan again then."""
        if seconds > 0:
            self.wake_in = seconds if self.wake_in is None else min(self.wake_in, seconds)

    @property
    def now(self) -> datetime:
        return self.fleet.now

    @property
    def spec(self) -> InferencePoolSpec:
        return self.fleet.spec

    def pod(self, name: str) -> PodView | None:
        return self._pods.get(name)

    def holders(self, version: str | None) -> tuple[protocol.PeerPart, ...]:
        """The healthy pods that serve `version` and offer it to peers (once per plan and version:
        every pod catching up asks, and a scan per asker made a scale-out O(pods^2))."""
        if version not in self._holders:
            label = _label(version)
            self._holders[version] = tuple(
                protocol.PeerPart(pod=p.name, source=held.p2p)
                for p in self.fleet.pods
                if p.healthy
                and p.serving == version
                and (held := _staged(p, label, None)) is not None
                and held.p2p is not None
            )
        return self._holders[version]

    def failure(self, pod: str, version: str, source: protocol.Source | None) -> ActionFailure | None:
        """The pod's failed action at `version` (with `source`: a Stage of that source, or an update)."""
        for f in self._failures.get((pod, version), ()):
            if f.source is None or f.source == source:
                return f
        return None

    def retry_in(self, f: ActionFailure) -> float:
        """Seconds until the failed action may be sent again (0: now)."""
        due = f.at + timedelta(seconds=backoff_s(f.attempts, self.config))
        wait = max(0.0, (due - self.now).total_seconds())
        self.due_in(wait)
        return wait

    def retry_note(self, f: ActionFailure) -> str:
        """How a failed action shows in the WeightVersion's status message."""
        wait = self.retry_in(f)
        when = f"retrying in {wait:.0f}s" if wait > 0 else "retrying"
        return f"pod {f.pod}: {f.message} ({f.attempts} failed attempt(s), {when})"

    def endpoint(self, pod: PodView) -> str:
        return f"http://{pod.ip}:{self.spec.engine.port}"

    def abs_source(self, src: SourceRef) -> protocol.Source:
        if src.trainer is not None:  # the agents read the trainer's memory: passed on as it is
            return protocol.Source(trainer=protocol.TrainerSource.model_validate(src.trainer.model_dump()))
        root = self.spec.checkpoint_volume.mount_path.rstrip("/")
        manifest = f"{root}/{src.sha256_manifest}" if src.sha256_manifest else None
        return protocol.Source(path=f"{root}/{src.path}", sha256_manifest=manifest)

    def source_of_current(self) -> SourceRef:
        return self.current_source or SourceRef(path=self.spec.model.path)

    def emit(self, kind: str, name: str, reason: str, message: str, warning: bool = False) -> None:
        self.actions.append(Emit(kind, name, reason, message, warning))

    def update_request(
        self,
        version: str,
        *,
        deadline: datetime | None,
        rank: int | None = None,
        group: protocol.BroadcastGroup | None = None,
        peers: tuple[protocol.PeerPart, ...] = (),
    ) -> protocol.UpdateRequest:
        timeout = 300.0
        if deadline is not None:
            timeout = max(1.0, (deadline - self.now).total_seconds())
        return protocol.UpdateRequest(
            version=version,
            mode=protocol.UpdateMode.P2P if peers else protocol.UpdateMode.BROADCAST,
            rank=rank,
            group=group,
            peers=peers,
            memory_budget_bytes=parse_quantity(self.spec.engine.update_memory_budget),
            request_policy=self.spec.update_policy.requests,
            timeout_seconds=timeout,
            max_bytes_per_second=self.spec.engine.transport.max_bytes_per_second,
        )


def _staged(
    pod: PodView, version: str, part: protocol.PartSpec | None, source: protocol.Source | None = None
) -> protocol.StagedVersion | None:
    """The pod's staged copy of `version` that holds `part`; with `source`, only one staged from it (a
    version deleted and created again from another checkpoint must not match the old bytes)."""
    if pod.agent is None:
        return None
    for s in pod.agent.staged:
        if s.version == version and (s.complete or s.part == part) and (source is None or s.source == source):
            return s
    return None


def _update_for(pod: PodView, version: str, stale: Sequence[str]) -> protocol.UpdateProgress | None:
    """The pod's latest update if it is to `version` and belongs to this attempt."""
    u = pod.agent.update if pod.agent else None
    if u is None or u.version != version or u.id in stale:
        return None
    return u


# ---- the rollout of one WeightVersion ------------------------------------------------------------------


def _transition(r: _Round, wv: VersionView, st: WeightVersionStatus, phase: Phase, message: str) -> None:
    warning = phase is Phase.FAILED
    r.emit("WeightVersion", wv.name, phase.value, message, warning)
    st.phase = phase
    st.message = message


def _fail(r: _Round, wv: VersionView, st: WeightVersionStatus, reason: str, message: str) -> None:
    _transition(r, wv, st, Phase.FAILED, message)
    st.completion_time = r.now
    st.conditions = set_condition(st.conditions, "Applied", False, reason, message, r.now, wv.generation)
    if not _is_true(st.conditions, "Staged"):
        st.conditions = set_condition(st.conditions, "Staged", False, reason, message, r.now, wv.generation)


def _is_true(conditions: Iterable[Condition], type_: str) -> bool:
    c = condition(conditions, type_)
    return c is not None and c.status is ConditionStatus.TRUE


def _form_group(r: _Round, wv: VersionView, st: WeightVersionStatus, attempt: int, stale: list[str]) -> bool:
    """Choose the group of this attempt; False when there is nobody to update yet."""
    eligible = sorted((p for p in r.fleet.pods if p.healthy), key=lambda p: p.name)
    if not eligible:
        return False
    if wv.spec.strategy is Strategy.P2P:
        seed, followers = eligible[:1], [p.name for p in eligible[1:]]
    else:
        seed, followers = eligible, []
    port = r.spec.engine.transport.master_port + (attempt - 1) % 16  # a fresh port per attempt
    st.rollout = RolloutState(
        attempt=attempt,
        members=[RolloutMember(pod=p.name, rank=i, address=p.ip or "") for i, p in enumerate(seed)],
        followers=followers,
        master_port=min(port, 65535),
        from_version=r.current,
        stale_updates=stale,
    )
    st.replicas = len(seed) + len(followers)
    st.updated_replicas = 0
    st.failed_replicas = 0
    return True


def _group(r: _Round, rollout: RolloutState) -> protocol.BroadcastGroup:
    n = len(rollout.members)
    return protocol.BroadcastGroup(
        members=tuple(
            protocol.GroupMember(
                rank=m.rank,
                pod=m.pod,
                address=m.address,
                part=protocol.PartSpec(index=m.rank, count=n) if n > 1 else None,
            )
            for m in rollout.members
        ),
        master_addr=rollout.members[0].address,
        master_port=rollout.master_port or r.spec.engine.transport.master_port,
    )


def _lost(r: _Round, m: RolloutMember) -> str | None:
    """Why a member can no longer take part (None: it can)."""
    pod = r.pod(m.pod)
    if pod is None:
        return f"pod {m.pod} is gone"
    if pod.deleting:
        return f"pod {m.pod} is being deleted"
    if not pod.running or pod.ip != m.address:
        return f"pod {m.pod} restarted or moved"
    return None


def _retry_or_fail(
    r: _Round, wv: VersionView, st: WeightVersionStatus, rollout: RolloutState, why: str
) -> None:
    attempts = r.spec.update_policy.max_attempts
    if rollout.attempt >= attempts:
        _fail(r, wv, st, "AttemptsExhausted", f"{why}; gave up after {attempts} attempt(s)")
        return
    stale = list(rollout.stale_updates)
    for m in rollout.members:
        pod = r.pod(m.pod)
        u = pod.agent.update if pod is not None and pod.agent is not None else None
        if u is not None and u.version == wv.spec.version and u.id not in stale:
            stale.append(u.id)
    r.emit("WeightVersion", wv.name, "Retrying", f"attempt {rollout.attempt} failed: {why}", warning=True)
    st.conditions = set_condition(st.conditions, "Staged", False, "Retrying", why, r.now, wv.generation)
    if _form_group(r, wv, st, rollout.attempt + 1, stale):
        st.phase = Phase.STAGING
        st.message = f"attempt {rollout.attempt + 1}: {why}"
        _do_staging(r, wv, st)
    else:
        st.phase = Phase.PENDING
        st.rollout = RolloutState(attempt=rollout.attempt + 1, stale_updates=stale)
        st.message = f"attempt {rollout.attempt} failed ({why}); waiting for a healthy pod"


def _attempt(rollout: RolloutState) -> str:
    return f"attempt {rollout.attempt}: " if rollout.attempt > 1 else ""


def _deadline(wv: VersionView, st: WeightVersionStatus) -> datetime:
    return (st.start_time or wv.created) + timedelta(seconds=parse_duration(wv.spec.timeout))


def _reused(r: _Round, wv: VersionView) -> str | None:
    """Why `wv` reuses a version that already names other bytes (None: it does not).

    A version names one checkpoint. A WeightVersion deleted and created again with the same version
    but another source would otherwise look done at once: the pods serve (and hold staged) that
    version already, from the old checkpoint."""
    version, src = wv.spec.version, wv.spec.source
    advice = "a version names one checkpoint: publish it as a new version"
    if version == r.current:
        cur = r.current_source
        if cur is not None and cur != src:
            return (
                f"version {version} is what pool {r.fleet.pool} serves, from source {cur.describe()}; "
                f"this WeightVersion names {src.describe()}: {advice}"
            )
        return None
    want = r.abs_source(src)
    for pod in r.fleet.pods:
        if pod.live and pod.agent is not None and pod.serving == version:
            held = _staged(pod, version, None)
            if held is None or held.source != want:
                was = f" from {held.source.describe()}" if held is not None else ""
                return f"pod {pod.name} serves version {version}{was}, not from {want.describe()}: {advice}"
    return None


def _do_pending(r: _Round, wv: VersionView, st: WeightVersionStatus) -> None:
    reused = _reused(r, wv)
    if reused is not None:
        _fail(r, wv, st, "VersionReused", reused)
        return
    if any(p.busy for p in r.fleet.pods if p.live):
        st.message = "waiting for the update in progress on the pods to finish"
        return
    prior = st.rollout or RolloutState()
    if _form_group(r, wv, st, prior.attempt, list(prior.stale_updates)):
        st.start_time = st.start_time or r.now
        n = len(st.rollout.members) if st.rollout else 0
        _transition(r, wv, st, Phase.STAGING, f"staging {wv.spec.version} on {n} pod(s)")
        _do_staging(r, wv, st)
        return
    live = [p for p in r.fleet.pods if p.live]
    if r.spec.replicas == 0 and not live:
        # Nobody to update: the version becomes current at once and future pods start from it.
        st.start_time = st.start_time or r.now
        _complete(r, wv, st, "no pods to update; new pods will take this version")
        return
    st.message = "waiting for a healthy pod (running, agent ready, no update in progress)"


def _do_staging(r: _Round, wv: VersionView, st: WeightVersionStatus) -> None:
    rollout = st.rollout
    assert rollout is not None
    version = wv.spec.version
    source = r.abs_source(wv.spec.source)
    for m in rollout.members:
        f = r.failure(m.pod, version, source)
        if f is not None and f.permanent:
            _fail(r, wv, st, "CheckpointInvalid", f"pod {f.pod} could not stage {version}: {f.message}")
            return
    lost = [why for m in rollout.members if (why := _lost(r, m))]
    if lost:
        _retry_or_fail(r, wv, st, rollout, "; ".join(lost))
        return
    group = _group(r, rollout)
    staged: list[protocol.StagedVersion] = []
    errors: list[str] = []
    for member in group.members:
        pod = r.pod(member.pod)
        assert pod is not None
        have = _staged(pod, version, member.part, source)
        if have is not None:
            staged.append(have)
        elif pod.agent is not None:
            f = r.failure(pod.name, version, source)
            if f is not None:
                errors.append(r.retry_note(f))
                if r.retry_in(f) > 0:
                    continue
            req = protocol.StageRequest(version=version, source=source, part=member.part)
            r.actions.append(Stage(pod.name, r.endpoint(pod), req))
    if len(staged) < len(group.members):
        st.message = _attempt(rollout) + f"staged on {len(staged)}/{len(group.members)} pod(s)"
        st.message += "".join(f"; {e}" for e in errors)
        return
    seconds = [s.stage_seconds for s in staged if s.stage_seconds is not None]
    staging = max(seconds) if seconds else (r.now - (st.start_time or r.now)).total_seconds()
    st.stage_durations = StageDurations(staging=round(staging, 3))
    st.conditions = set_condition(
        st.conditions, "Staged", True, "Staged", f"staged on {len(staged)} pod(s)", r.now, wv.generation
    )
    _transition(r, wv, st, Phase.UPDATING, f"updating {len(group.members)} pod(s) by broadcast")
    errors = _send_updates(r, wv, st, rollout, group, only_missing=False)
    st.message += "".join(f"; {e}" for e in errors)


def _send_updates(
    r: _Round,
    wv: VersionView,
    st: WeightVersionStatus,
    rollout: RolloutState,
    group: protocol.BroadcastGroup,
    only_missing: bool,
) -> list[str]:
    """Send the group's update to its members (`only_missing`: those that have not received it); a
    member whose last update request failed waits out its backoff. Answers the failures' notes."""
    errors: list[str] = []
    for member in group.members:
        pod = r.pod(member.pod)
        if pod is None or pod.agent is None:
            continue
        if only_missing and (
            pod.serving == wv.spec.version or _update_for(pod, wv.spec.version, rollout.stale_updates)
        ):
            continue
        f = r.failure(pod.name, wv.spec.version, None)
        if f is not None:
            errors.append(r.retry_note(f))
            if r.retry_in(f) > 0:
                continue
        req = r.update_request(wv.spec.version, deadline=_deadline(wv, st), rank=member.rank, group=group)
        r.actions.append(StartUpdate(pod.name, r.endpoint(pod), req))
    return errors


def _do_updating(r: _Round, wv: VersionView, st: WeightVersionStatus) -> None:
    rollout = st.rollout
    assert rollout is not None
    version = wv.spec.version
    group = _group(r, rollout)
    done: list[PodView] = []
    running = 0
    problems: list[str] = []
    failed = 0
    rejected = _rejected(r, rollout, version)
    if rejected is not None:
        # Retrying cannot help (the agent refused the update as sent, or its update failed for a
        # reason it classes as permanent): fail now with the agent's words, not at the timeout.
        _fail(r, wv, st, "UpdateRejected", rejected)
        return
    for m in rollout.members:
        pod = r.pod(m.pod)
        why = _lost(r, m)
        if why or pod is None:
            problems.append(why or f"pod {m.pod} is gone")
            continue
        if pod.serving == version:
            done.append(pod)
            continue
        u = _update_for(pod, version, rollout.stale_updates)
        if u is None:
            part = group.members[m.rank].part
            source = r.abs_source(wv.spec.source)
            if pod.agent is not None and not pod.busy and _staged(pod, version, part, source) is None:
                # Its agent restarted since staging: the update can never start there.
                problems.append(f"pod {pod.name} no longer holds its staged part of {version}")
            continue  # not received yet (or the operator restarted before sending): sent below
        if not u.done:
            running += 1
        elif u.stage is protocol.UpdateStage.FAILED:
            failed += 1
            problems.append(f"pod {pod.name}: {u.error or 'update failed'}")
    st.updated_replicas = len(done)
    st.failed_replicas = failed
    if problems:
        if running:
            st.message = f"waiting for {running} pod(s) to abort: " + "; ".join(problems)
            return
        _retry_or_fail(r, wv, st, rollout, "; ".join(problems))
        return
    if len(done) < len(rollout.members):
        errors = _send_updates(r, wv, st, rollout, group, only_missing=True)
        st.message = _attempt(rollout) + f"updated {len(done)}/{len(rollout.members)} pod(s)"
        st.message += "".join(f"; {e}" for e in errors)
        return
    _record_update_durations(st, done, version)
    # The group is done; followers (P2P strategy) take the version from it.
    pending = [
        f for f in rollout.followers if (p := r.pod(f)) is not None and p.live and p.serving != version
    ]
    notes: list[str] = []
    for name in pending:
        pod = r.pod(name)
        assert pod is not None
        _catch_up(r, pod, version, wv.spec.source, deadline=_deadline(wv, st))
        if (held := r.failure(name, version, r.abs_source(wv.spec.source))) is not None:
            notes.append(r.retry_note(held))
    st.updated_replicas = len(done) + len(rollout.followers) - len(pending)
    if pending:
        st.message = f"group updated; {len(pending)} follower(s) catching up"
        st.message += "".join(f"; {n}" for n in notes)
        return
    _complete(r, wv, st, f"{st.updated_replicas} pod(s) serve {version}")


def _rejected(r: _Round, rollout: RolloutState, version: str) -> str | None:
    """Why a member's update to `version` can never succeed (None: none is known): its StartUpdate
    was refused with a permanent error, or its agent reports this attempt's update Failed with a
    permanent `error_code`."""
    for m in rollout.members:
        f = r.failure(m.pod, version, None)
        if f is not None and f.source is None and f.permanent:
            return f"pod {m.pod} refused the update to {version}: {f.message}"
        pod = r.pod(m.pod)
        u = _update_for(pod, version, rollout.stale_updates) if pod is not None else None
        if (
            u is not None
            and u.stage is protocol.UpdateStage.FAILED
            and u.error_code is not None
            and u.error_code.permanent
        ):
            return f"pod {m.pod}: {u.error or 'update failed'} ({u.error_code})"
    return None


def _record_update_durations(st: WeightVersionStatus, done: Sequence[PodView], version: str) -> None:
    transfer: list[float] = []
    reload: list[float] = []
    for pod in done:
        u = pod.agent.update if pod.agent else None
        if u is not None and u.version == version:
            transfer.append(u.durations.get("connect", 0.0) + u.durations.get("transfer", 0.0))
            if "reload" in u.durations:
                reload.append(u.durations["reload"])
    durations = st.stage_durations or StageDurations()
    st.stage_durations = durations.model_copy(
        update={
            "transfer": round(max(transfer), 3) if transfer else durations.transfer,
            "reload": round(max(reload), 3) if reload else durations.reload,
        }
    )


def _complete(r: _Round, wv: VersionView, st: WeightVersionStatus, message: str) -> None:
    st.completion_time = r.now
    st.conditions = set_condition(st.conditions, "Applied", True, "Applied", message, r.now, wv.generation)
    if not _is_true(st.conditions, "Staged"):
        st.conditions = set_condition(st.conditions, "Staged", True, "Staged", message, r.now, wv.generation)
    _transition(r, wv, st, Phase.COMPLETE, message)
    r.current = wv.spec.version
    r.current_source = wv.spec.source
    r.emit("InferencePool", r.fleet.pool, "VersionChanged", f"now serving {wv.spec.version}")


def _drive(r: _Round, wv: VersionView) -> WeightVersionStatus:
    st = wv.status.model_copy(deep=True)
    st.observed_generation = wv.generation
    if not _is_true(st.conditions, "Accepted"):
        st.conditions = set_condition(
            st.conditions, "Accepted", True, "Valid", f"target of pool {r.fleet.pool}", r.now, wv.generation
        )
        r.emit("WeightVersion", wv.name, "Accepted", f"target of pool {r.fleet.pool}")
    if st.phase is not Phase.PENDING and st.rollout is None:
        st.phase = Phase.PENDING  # a status written by hand or by an older operator: start over
    if r.now > _deadline(wv, st):
        last = f" ({st.message})" if st.message else ""
        _fail(r, wv, st, "Timeout", f"timed out after {wv.spec.timeout} in phase {st.phase.value}{last}")
        return st
    r.due_in((_deadline(wv, st) - r.now).total_seconds())
    if st.phase is Phase.PENDING:
        _do_pending(r, wv, st)
    elif st.phase is Phase.STAGING:
        _do_staging(r, wv, st)
    elif st.phase is Phase.UPDATING:
        _do_updating(r, wv, st)
    if not st.phase.terminal:
        r.active = True
    return st


def _supersede(r: _Round, wv: VersionView, by: VersionView) -> WeightVersionStatus:
    st = wv.status.model_copy(deep=True)
    message = f"superseded by {by.spec.version} before it completed"
    st.completion_time = r.now
    st.conditions = set_condition(
        st.conditions, "Applied", False, "Superseded", message, r.now, wv.generation
    )
    _transition(r, wv, st, Phase.SUPERSEDED, message)
    return st


def orphan_status(wv: VersionView, namespace: str, now: datetime) -> WeightVersionStatus | None:
    """The status of a WeightVersion whose InferencePool does not exist (None: leave it as it is).

    A rollout that started (its pool was deleted meanwhile) fails at once; a version that never
    started waits for its pool (created in the same `kubectl apply`, say) as Accepted=False, and fails
    once its timeout has passed. Either way no WeightVersion stays unfinished past its timeout."""
    st = wv.status.model_copy(deep=True)
    if st.phase.terminal:
        return None
    pool = wv.spec.pool_ref.name
    missing = f"InferencePool {pool} does not exist in namespace {namespace}"
    # Accepted=True: a pool had taken it as its target, so that pool was deleted.
    started = st.phase is not Phase.PENDING or st.rollout is not None or _is_true(st.conditions, "Accepted")
    gen = wv.generation
    if started or now > _deadline(wv, st):
        why = f"{missing}: it was deleted during the rollout" if started else missing
        why += "" if started else f" (waited {wv.spec.timeout})"
        st.phase, st.message, st.completion_time = Phase.FAILED, why, now
        st.conditions = set_condition(st.conditions, "Accepted", False, "PoolNotFound", why, now, gen)
        st.conditions = set_condition(st.conditions, "Applied", False, "PoolNotFound", why, now, gen)
        if not _is_true(st.conditions, "Staged"):
            st.conditions = set_condition(st.conditions, "Staged", False, "PoolNotFound", why, now, gen)
        return st
    accepted = condition(st.conditions, "Accepted")
    if accepted is not None and accepted.reason == "PoolNotFound" and st.message == missing:
        return None
    st.conditions = set_condition(st.conditions, "Accepted", False, "PoolNotFound", missing, now, gen)
    st.message = missing
    return st


def invalid_pool_status(wv: VersionView, pool: str, error: str, now: datetime) -> WeightVersionStatus | None:
    """The status of a WeightVersion whose InferencePool's template is invalid (None: leave it as it
    is). Such a pool gets no plan, so nothing else ends its versions: one still unfinished fails at its
    timeout with reason `InvalidTemplate`; before, its message says why it does not move (it resumes
    once the template is fixed)."""
    st = wv.status.model_copy(deep=True)
    if st.phase.terminal:
        return None
    why = f"InferencePool {pool} has an invalid template: {error}"
    if now > _deadline(wv, st):
        gen = wv.generation
        message = f"timed out after {wv.spec.timeout} in phase {st.phase.value}: {why}"
        st.phase, st.message, st.completion_time = Phase.FAILED, message, now
        st.conditions = set_condition(st.conditions, "Applied", False, "InvalidTemplate", message, now, gen)
        if not _is_true(st.conditions, "Staged"):
            st.conditions = set_condition(
                st.conditions, "Staged", False, "InvalidTemplate", message, now, gen
            )
        return st
    if st.message == why:
        return None
    st.message = why
    return st


def invalid_pool(
    versions: Iterable[VersionView], pool: str, error: str, now: datetime, config: PlannerConfig
) -> tuple[dict[str, WeightVersionStatus], float]:
    """For a pool whose template is invalid: the statuses to write (`invalid_pool_status`, by object
    name) and when to look again (at the next deadline of a version left unfinished, at most
    `idle_requeue` from now)."""
    statuses: dict[str, WeightVersionStatus] = {}
    requeue = config.idle_requeue
    for wv in versions:
        st = invalid_pool_status(wv, pool, error, now)
        if st is not None:
            statuses[wv.name] = st
        if not (st or wv.status).phase.terminal:
            due = (_deadline(wv, wv.status) - now).total_seconds()
            requeue = min(requeue, max(1.0, due + 0.5))
    return statuses, requeue


def deadline(wv: VersionView) -> datetime:
    """When `wv` times out (its timeout from the start of its rollout, or from its creation)."""
    return _deadline(wv, wv.status)


# ---- catch-up and pods ---------------------------------------------------------------------------------


def _catch_up(
    r: _Round, pod: PodView, version: str | None, source: SourceRef, deadline: datetime | None
) -> None:
    """Bring one pod to `version`: from peers that hold it, or from storage applied alone (rule 3)."""
    if pod.busy or pod.agent is None or not pod.running or not pod.ip or pod.deleting:
        return
    if not pod.agent.engine_up:
        return  # vLLM is still starting: an update now could only time out waiting for it
    label = _label(version)
    u = pod.agent.update
    p2p_failed = False
    if u is not None and u.version == label and u.stage is protocol.UpdateStage.FAILED:
        # A failed peer-to-peer read (no holder left, peers unreachable) goes to storage at once: no
        # backoff and no p2p retry ping-pong. After a failed storage attempt the backoff applies.
        p2p_failed = u.mode is protocol.UpdateMode.P2P
        finished = u.finished_at or u.started_at
        waited = (r.now - finished).total_seconds()
        if not p2p_failed and waited < r.config.retry_backoff:
            r.due_in(r.config.retry_backoff - waited)
            r.degraded.append(f"pod {pod.name} failed to catch up to {label}: {u.error}")
            return
    f = r.failure(pod.name, label, r.abs_source(source))
    if f is not None and r.retry_in(f) > 0:
        what = "update to" if f.source is None else "stage"
        r.degraded.append(f"pod {pod.name} cannot {what} {label}: {f.message}")
        return
    r.active = True
    holders = r.holders(version)
    if r.config.p2p_catch_up and holders and not p2p_failed:
        req = r.update_request(label, deadline=deadline, peers=holders)
        r.actions.append(StartUpdate(pod.name, r.endpoint(pod), req))
        return
    if _staged(pod, label, None, r.abs_source(source)) is None:
        stage = protocol.StageRequest(version=label, source=r.abs_source(source), part=None)
        r.actions.append(Stage(pod.name, r.endpoint(pod), stage))
        return
    alone = protocol.BroadcastGroup(
        members=(protocol.GroupMember(rank=0, pod=pod.name, address=pod.ip, part=None),),
        master_addr=pod.ip,
        master_port=r.spec.engine.transport.master_port,
    )
    req = r.update_request(label, deadline=deadline, rank=0, group=alone)
    r.actions.append(StartUpdate(pod.name, r.endpoint(pod), req))


def _sync_pods(r: _Round, failed: dict[str, PodVerification]) -> None:
    for pod in r.fleet.pods:
        if pod.agent is None or pod.deleting:
            continue  # unknown: leave label and gate as they are rather than flap on a missed poll
        label = _label(pod.serving)
        bad = failed.get(pod.name)
        gate = pod.serving == r.current and (pod.agent.ready or pod.busy) and bad is None
        if gate:
            reason, message = "ServingCurrentVersion", f"serves {_label(r.current)}"
        elif bad is not None and pod.serving == r.current:
            reason, message = "VerificationFailed", bad.message
        elif pod.serving != r.current:
            reason, message = "OtherVersion", f"serves {label}, the pool serves {_label(r.current)}"
        else:
            reason, message = "AgentNotReady", pod.agent.last_error or "the agent is not ready"
        want_label = label if label != pod.label_version else None
        # A gate that stays False for another reason is written again: its reason says why now (a
        # pod that lagged behind and then failed verification must not keep saying OtherVersion).
        stale_reason = pod.gate_reason is not None and pod.gate_reason != reason
        want_gate = gate if gate != pod.gate or stale_reason else None
        if want_label is None and want_gate is None:
            continue
        r.actions.append(SyncPod(pod.name, want_label, want_gate, reason, message))


def _verify(r: _Round, ordered: Sequence[VersionView]) -> dict[str, PodVerification]:
    """Which pods failed verification (rule 4); each WeightVersion lists those serving it."""
    found = verification.verdict(
        verification.Checked(p.name, p.serving, p.agent.weights_check if p.agent else None)
        for p in r.fleet.pods
        if p.live and p.agent is not None and not p.busy
    )
    r.disagreements.extend(found.notes)
    by_version: dict[str | None, list[PodVerification]] = {}
    for v in sorted(found.failed.values(), key=lambda v: v.pod):
        by_version.setdefault(v.version, []).append(v)
    for wv in ordered:
        entries = by_version.get(wv.spec.version, [])
        if not entries and not wv.status.verification and wv.name not in r.statuses:
            continue  # the common case, asked for every version of the history: nothing to write
        st = r.statuses.get(wv.name) or wv.status
        if st.verification == entries:
            continue
        before = {(v.pod, v.level) for v in st.verification}
        st = st.model_copy(deep=True)
        st.verification = entries
        r.statuses[wv.name] = st
        for v in entries:
            if (v.pod, v.level) not in before:
                r.emit("WeightVersion", wv.name, "VerificationFailed", v.message, warning=True)
    return found.failed


def _drop_stale(r: _Round, keep: set[str]) -> None:
    for pod in r.fleet.pods:
        if pod.agent is None or pod.busy or pod.deleting or not pod.ip:
            continue
        for s in pod.agent.staged:
            if s.version not in keep and _norm(s.version) != pod.serving:
                r.actions.append(DropStaged(pod.name, r.endpoint(pod), s.version))


# ---- the pool ------------------------------------------------------------------------------------------


def _pool_status(
    r: _Round, target: VersionView | None, target_status: WeightVersionStatus | None
) -> InferencePoolStatus:
    fleet = r.fleet
    live = [p for p in fleet.pods if p.live]
    target_version = r.current
    if target is not None and target_status is not None and target_status.phase is not Phase.FAILED:
        target_version = target.spec.version
    ready = sum(1 for p in live if p.ready)
    updated = sum(1 for p in live if p.agent is not None and p.serving == target_version)
    st = fleet.status.model_copy(deep=True)
    st.observed_generation = fleet.generation
    st.replicas = len(live)
    st.ready_replicas = ready
    st.updated_replicas = updated
    st.current_version = r.current
    st.current_source = r.current_source
    st.target_version = target_version
    st.selector = f"{POOL_LABEL}={fleet.pool}"
    now, gen, desired = r.now, fleet.generation, fleet.spec.replicas
    conds = st.conditions
    available = ready >= 1 or desired == 0
    conds = set_condition(
        conds,
        "Available",
        available,
        "ReplicasReady" if available else "NoReplicasReady",
        f"{ready}/{desired} replicas ready",
        now,
        gen,
    )
    rolling = target_status is not None and not target_status.phase.terminal
    converged = not rolling and len(live) == desired and ready == desired and updated == len(live)
    conds = set_condition(
        conds,
        "Progressing",
        not converged,
        "Converged" if converged else ("RolloutInProgress" if rolling else "Reconciling"),
        f"{updated}/{desired} replicas serve {_label(target_version)}, {ready} ready",
        now,
        gen,
    )
    updating = (
        rolling and target_status is not None and target_status.phase in (Phase.STAGING, Phase.UPDATING)
    )
    conds = set_condition(
        conds,
        "WeightsUpdating",
        updating,
        target_status.phase.value if updating and target_status else "Idle",
        f"rolling out {target.spec.version}" if updating and target else "",
        now,
        gen,
    )
    failed = target is not None and target_status is not None and target_status.phase is Phase.FAILED
    problems = list(r.degraded) + list(r.disagreements)
    if failed:
        assert target is not None and target_status is not None
        problems.insert(0, f"WeightVersion {target.name} failed: {target_status.message}")
    conds = set_condition(
        conds,
        "Degraded",
        bool(problems),
        _degraded_reason(failed, r),
        "; ".join(problems),
        now,
        gen,
    )
    st.conditions = conds
    return st


def _degraded_reason(rollout_failed: bool, r: _Round) -> str:
    """The Degraded condition's reason: one of its causes (all of them are in its message)."""
    if r.degraded:
        return "CatchUpFailing"
    if rollout_failed:
        return "RolloutFailed"
    if r.disagreements:
        return "WeightsDisagree"  # verification: pods differ on the processed weights, no majority
    return "AsExpected"


def plan(fleet: Fleet, failures: Sequence[ActionFailure] = (), config: PlannerConfig | None = None) -> Plan:
    r = _Round(fleet=fleet, config=config or PlannerConfig(), failures=failures)
    r.current = _norm(fleet.status.current_version)
    r.current_source = fleet.status.current_source
    ordered = _numbered(r, fleet.versions)
    target = ordered[-1] if ordered else None
    for wv in ordered[:-1]:
        if not wv.status.phase.terminal and target is not None:
            r.statuses[wv.name] = _supersede(r, wv, target)
    target_status: WeightVersionStatus | None = None
    if target is not None:
        target_status = target.status
        if not target.status.phase.terminal:
            target_status = _drive(r, target)
            r.statuses[target.name] = target_status
    rolling = target_status is not None and target_status.phase in (Phase.STAGING, Phase.UPDATING)
    if not rolling:
        # Catch-up waits while a broadcast runs: the pods it would update are either in the group or
        # will be brought to the new version once it is current.
        for pod in sorted(fleet.pods, key=lambda p: p.name):
            if pod.live and pod.agent is not None and pod.serving != r.current:
                _catch_up(r, pod, r.current, r.source_of_current(), deadline=None)
    _sync_pods(r, _verify(r, ordered))
    keep = {_label(r.current)}
    if target is not None and target_status is not None and not target_status.phase.terminal:
        keep.add(target.spec.version)
    _drop_stale(r, keep)
    # Phases as read, not as this plan writes them: a version superseded now is pruned next time.
    limit = fleet.spec.version_history_limit
    prune = prune_versions(
        ordered, {r.current, _norm(fleet.status.current_version)}, limit, fleet.hidden_history
    )
    if prune:
        pruned = tuple(PrunedVersion(v.name, v.uid, v.spec.version) for v in prune)
        r.actions.append(PruneVersions(pruned, limit))
    pool_status = _pool_status(r, target, target_status)
    if not r.active and any(p.live and not p.ready for p in fleet.pods):
        r.active = True
    # Written oldest first: an operator that stops midway has numbered a prefix of the new versions,
    # so the ones left unnumbered still come after them.
    before = {v.name: v.status for v in fleet.versions} if r.statuses else {}
    changed = {
        name: st
        for name, st in sorted(r.statuses.items(), key=lambda kv: kv[1].sequence or 0)
        if st != before.get(name)
    }
    requeue = r.config.active_requeue if r.active else r.config.idle_requeue
    if r.wake_in is not None:
        requeue = min(requeue, r.wake_in + DUE_SLACK_S)
    return Plan(tuple(r.actions), changed, pool_status, requeue)


def prune_versions(
    versions: Sequence[VersionView], protected: Collection[str | None], limit: int, hidden: int = 0
) -> tuple[VersionView, ...]:
    """The WeightVersions to delete, oldest first (rule 5): of the finished ones (terminal phase) whose
    version is not `protected` (the pool's current version), all but the `limit` newest, in creation
    order (`resources.version_order`). Never one in progress, never a protected one, and never the
    newest of all (the pool's target: a Failed target keeps showing why). Unnumbered versions sort
    after numbered ones, as everywhere. `hidden`: more such versions, not given, all newer than the
    ones this returns (`Fleet.hidden_history`)."""
    ordered = sorted(versions, key=_order)
    history = [v for v in ordered if v.status.phase.terminal and v.spec.version not in protected]
    excess = history[: max(0, len(history) + hidden - limit)]
    newest = ordered[-1] if ordered else None
    return tuple(v for v in excess if v is not newest)
