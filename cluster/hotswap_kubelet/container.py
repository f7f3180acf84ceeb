"""One container as a local process group: start through the launcher, watch, stop, restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .podstatus import ContainerView, Terminated
from .probes import ProbeState, monotonic, run_probe
from .volumes import Mount

Obj = dict[str, Any]
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")


def utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class ContainerRunner:
    spec: Obj
    log_path: str
    run_dir: str
    mount_mode: str
    view: ContainerView = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    started_mono: float = 0.0
    stop_deadline: float | None = None
    stop_reason: str = ""
    next_start: float = 0.0  # crash-loop back-off
    backoff: float = 0.0
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    startup: ProbeState | None = None

    def __post_init__(self) -> None:
        self.view = ContainerView(name=self.spec["name"], image=self.spec.get("image", ""))

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self, argv: list[str], env: dict[str, str], mounts: list[Mount], cwd: str) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        spec_path = os.path.join(self.run_dir, f"{self.name}.launch.json")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "argv": argv,
                    "env": env,
                    "cwd": cwd,
                    "mounts": [m.to_json() for m in mounts],
                    "mountMode": self.mount_mode,
                },
                f,
            )
        with open(self.log_path, "ab") as log:
            log.write(f"--- hotswap-kubelet: starting {self.name} at {utcnow()}: {argv}\n".encode())
            log.flush()
            # Own session = own process group, so stop() reaches every process the command spawns.
            self.proc = subprocess.Popen(
                [sys.executable, LAUNCHER, spec_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        with open(os.path.join(self.run_dir, f"{self.name}.pid"), "w") as f:
            f.write(str(self.proc.pid))
        self.env = env
        self.started_mono = monotonic()
        self.stop_deadline = None
        self.stop_reason = ""
        self.view.running_since = utcnow()
        self.view.pid = self.proc.pid
        self.view.terminated = None
        self.view.waiting_reason = ""
        self.view.ready = False
        probes = self.spec
        self.readiness = (
            ProbeState.new(probes["readinessProbe"], self.started_mono, False)
            if probes.get("readinessProbe")
            else None
        )
        self.liveness = (
            ProbeState.new(probes["livenessProbe"], self.started_mono, True)
            if probes.get("livenessProbe")
            else None
        )
        self.startup = (
            ProbeState.new(probes["startupProbe"], self.started_mono, False)
            if probes.get("startupProbe")
            else None
        )
        self.view.started = self.startup is None

    def poll(self) -> bool:
        """Reaps the process if it exited; returns True when it just did."""
        if self.proc is None:
            return False
        code = self.proc.poll()
        if code is None:
            if self.stop_deadline is not None and monotonic() >= self.stop_deadline:
                kill_group(self.proc.pid, signal.SIGKILL)
            return False
        # The group dies with its leader, as a container's processes die with its PID 1.
        kill_group(self.proc.pid, signal.SIGKILL)
        exit_code = code if code >= 0 else 128 - code
        reason = self.stop_reason or ("Completed" if exit_code == 0 else "Error")
        if exit_code == 128 and not self.stop_reason:
            reason = "StartError"
        term = Terminated(exit_code, reason, self.view.running_since or utcnow(), utcnow())
        self.view.terminated = term
        self.view.running_since = None
        self.view.pid = None
        self.view.ready = False
        self.view.started = False
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.run_dir, f"{self.name}.pid"))
        return True

    def stop(self, grace: float, reason: str = "") -> None:
        """SIGTERM now, SIGKILL once `grace` seconds passed (enforced by poll())."""
        if self.proc is None:
            return
        if self.stop_deadline is None:
            self.stop_reason = reason
            kill_group(self.proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            self.stop_deadline = monotonic() + grace

    def mark_restart(self, backoff_max: float) -> None:
        """Moves the last run into lastState and schedules the next start after a back-off that
        doubles with each crash, as the kubelet's CrashLoopBackOff does (capped lower here)."""
        self.view.last_terminated = self.view.terminated
        self.view.restart_count += 1
        self.backoff = min(backoff_max, max(1.0, self.backoff * 2))
        self.next_start = monotonic() + self.backoff

    def run_probes(self, pod_ip: str) -> bool:
        """Runs the probes that are due; returns True if liveness (or startup) failed for good."""
        if self.proc is None or self.stop_deadline is not None:
            return False
        now = monotonic()
        pid = self.proc.pid if self.mount_mode == "namespace" else None
        if self.startup is not None and not self.view.started:
            if self.startup.due(now):
                ok, msg = run_probe(self.startup.probe, self.spec, pod_ip, self.env, pid)
                self.startup.record(ok, msg, now)
                if self.startup.result:
                    self.view.started = True
                    if self.liveness:
                        self.liveness.next_at = now + float(self.liveness.probe.get("initialDelaySeconds", 0))
                elif self.startup.failures >= int(self.startup.probe.get("failureThreshold", 3)):
                    return True
            return False
        if self.liveness is not None and self.liveness.due(now):
            ok, msg = run_probe(self.liveness.probe, self.spec, pod_ip, self.env, pid)
            self.liveness.record(ok, msg, now)
            if not self.liveness.result:
                return True
        if self.readiness is not None:
            if self.readiness.due(now):
                ok, msg = run_probe(self.readiness.probe, self.spec, pod_ip, self.env, pid)
                self.readiness.record(ok, msg, now)
            self.view.ready = self.readiness.result
        else:
            self.view.ready = True
        return False
