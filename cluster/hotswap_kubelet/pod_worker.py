"""One thread per pod bound to this node: runs its containers and reports its status."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .container import ContainerRunner, utcnow
from .events import emit
from .ipam import PodIPAllocator
from .kubeapi import ApiError, KubeApi
from .podenv import ConfigError, command_line, container_env
from .podstatus import compute_status
from .probes import monotonic
from .volumes import VolumeManager

Obj = dict[str, Any]
log = logging.getLogger("hotswap_kubelet.pod")


@dataclass(frozen=True)
class PodContext:
    """What every pod worker shares: the API, addresses, folders and process settings."""

    api: KubeApi
    ips: PodIPAllocator
    node_name: str
    host_ip: str
    state_dir: str
    log_dir: str
    base_env: dict[str, str]
    cwd: str
    mount_mode: str
    backoff_max: float
    sync_period: float = 0.5


def strip_times(status: Obj) -> Obj:
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]
    ]
    return out


class PodWorker(threading.Thread):
    def __init__(self, ctx: PodContext, pod: Obj, on_exit: Callable[[str], None]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self._pod = pod
        self._gone = False  # DELETED event seen: the API object no longer exists
        self._shutdown = False  # the kubelet is stopping
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._on_exit = on_exit
        self.pod_dir = os.path.join(ctx.state_dir, "pods", self.uid)
        self.volumes = VolumeManager(ctx.api, pod, self.pod_dir)
        self.volumes_ready = False
        self.config_error = ""
        self.pod_ip = ""
        self.start_time = pod.get("status", {}).get("startTime") or utcnow()
        self.last_sent: Obj | None = None
        spec = pod["spec"]
        self.init = [self._runner(c) for c in spec.get("initContainers") or []]
        self.main = [self._runner(c) for c in spec.get("containers") or []]
        # After a kubelet restart the pod's containers start again: count that as a restart.
        prior = {s["name"]: s for s in pod.get("status", {}).get("containerStatuses") or []}
        for r in self.main:
            st = prior.get(r.name)
            if st is not None:
                r.view.restart_count = int(st.get("restartCount", 0)) + (
                    1 if "running" in st.get("state", {}) else 0
                )
        self.init_done = bool(prior) or not self.init

    def _runner(self, c: Obj) -> ContainerRunner:
        log_path = os.path.join(self.ctx.log_dir, "pods", f"{self.ns}_{self.pod_name}_{c['name']}.log")
        return ContainerRunner(c, log_path, os.path.join(self.pod_dir, "run"), self.ctx.mount_mode)

    # --- called from the kubelet's watch thread --------------------------------------------------
    def update(self, pod: Obj) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def gone(self) -> None:
        self._gone = True
        self._wake.set()

    def shutdown(self) -> None:
        self._shutdown = True
        self._wake.set()

    # --- the worker loop -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s/%s failed", self.ns, self.pod_name)
            self._kill_all(0)
        finally:
            self._on_exit(self.uid)

    def _run(self) -> None:
        os.makedirs(os.path.join(self.ctx.log_dir, "pods"), exist_ok=True)
        pod = self._pod
        if pod["spec"].get("hostNetwork"):
            self.pod_ip = self.ctx.host_ip
        else:
            self.pod_ip = self.ctx.ips.allocate(self.uid, preferred=pod.get("status", {}).get("podIP"))
        while True:
            with self._lock:
                pod = self._pod
            if self._shutdown:
                self._kill_all(min(5.0, self._grace(pod)))
                return
            if self._gone:
                self._kill_all(0)
                self._cleanup()
                return
            if pod["metadata"].get("deletionTimestamp"):
                for r in self.init + self.main:
                    if r.running:
                        emit(self.ctx.api, pod, "Killing", f"Stopping container {r.name}")
                self._kill_all(self._grace(pod))
                self._finalize(pod)
                return
            try:
                self._sync(pod)
            except ApiError as e:
                log.warning("pod %s/%s: API error: %s", self.ns, self.pod_name, e)
            self._wake.wait(self.ctx.sync_period)
            self._wake.clear()

    def _grace(self, pod: Obj) -> float:
        meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        return float(pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _kill_all(self, grace: float) -> None:
        """SIGTERM to every container's process group, SIGKILL after `grace` seconds."""
        runners = [r for r in self.init + self.main if r.running]
        for r in runners:
            r.stop(grace)
        while any(r.running for r in runners):
            for r in runners:
                r.poll()
            time.sleep(0.05)

    def _finalize(self, pod: Obj) -> None:
        try:
            self.ctx.api.delete(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                raise
        self._cleanup()

    def _cleanup(self) -> None:
        self.ctx.ips.release(self.uid)
        shutil.rmtree(self.pod_dir, ignore_errors=True)

    # --- one pass: start what should run, probe, report --------------------------------------------
    def _sync(self, pod: Obj) -> None:
        for r in self.init + self.main:
            r.poll()
        policy = pod["spec"].get("restartPolicy", "Always")
        self.volumes.pod = pod  # newest object: downward-API files see podIP once it is reported
        if not self.volumes_ready and pod.get("status", {}).get("podIP"):
            try:
                self.volumes.prepare()
                self.volumes_ready = True
                self.config_error = ""
            except (ConfigError, OSError) as e:
                if str(e) != self.config_error:
                    emit(self.ctx.api, pod, "FailedMount", str(e), warning=True)
                self.config_error = str(e)
        if self.volumes_ready:
            if not self.init_done:
                self._sync_init(pod, policy)
            if self.init_done:
                for r in self.main:
                    self._sync_container(pod, r, policy)
        else:
            for r in self.init + self.main:
                r.view.waiting_reason = "ContainerCreating"
                r.view.waiting_message = self.config_error
        self._report(pod)

    def _sync_init(self, pod: Obj, policy: str) -> None:
        for r in self.init:
            term = r.view.terminated
            if term is not None and term.exit_code == 0 and not r.running:
                continue
            if r.running:
                return
            if term is not None:  # failed
                if policy == "Never":
                    return
                if r.next_start == 0.0 or r.view.last_terminated is not term:
                    r.mark_restart(self.ctx.backoff_max)
                if monotonic() < r.next_start:
                    r.view.waiting_reason = "CrashLoopBackOff"
                    return
            self._start(pod, r)
            return
        self.init_done = True

    def _sync_container(self, pod: Obj, r: ContainerRunner, policy: str) -> None:
        if r.running:
            was_ready = r.view.ready
            if r.run_probes(self.pod_ip):
                log.info(
                    "pod %s/%s: container %s failed its liveness/startup probe",
                    self.ns,
                    self.pod_name,
                    r.name,
                )
                kind = "Liveness" if r.view.started else "Startup"
                probe = r.liveness if r.view.started else r.startup
                detail = probe.last_message if probe else ""
                emit(self.ctx.api, pod, "Unhealthy", f"{kind} probe failed: {detail}", warning=True)
                emit(
                    self.ctx.api,
                    pod,
                    "Killing",
                    f"Container {r.name} failed {kind.lower()} probe, will be restarted",
                )
                r.stop(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), "Error")
            elif r.readiness is not None and r.readiness.failed_run_reported(was_ready):
                # When the container stops being ready, or one that never was reaches the failure
                # threshold; again when the failure changes (ProbeState.failed_run_reported).
                emit(
                    self.ctx.api,
                    pod,
                    "Unhealthy",
                    f"Readiness probe failed: {r.readiness.last_message}",
                    warning=True,
                )
            return
        term = r.view.terminated
        if term is None:
            self._start(pod, r)
            return
        restart = policy == "Always" or (policy == "OnFailure" and term.exit_code != 0)
        if not restart:
            return
        if r.view.last_terminated is not term:
            r.mark_restart(self.ctx.backoff_max)
            emit(self.ctx.api, pod, "BackOff", f"Back-off restarting failed container {r.name}", warning=True)
        if monotonic() < r.next_start:
            r.view.waiting_reason = "CrashLoopBackOff"
            r.view.waiting_message = (
                f"back-off {r.backoff:.0f}s restarting failed container={r.name} pod={self.pod_name}"
            )
            return
        self._start(pod, r)

    def _start(self, pod: Obj, r: ContainerRunner) -> None:
        base = dict(self.ctx.base_env)
        base.update(
            {
                "HOSTNAME": pod["spec"].get("hostname") or self.pod_name,
                "HOTSWAP_POD_UID": self.uid,
                "HOTSWAP_POD": f"{self.ns}/{self.pod_name}",
                "HOTSWAP_KUBELET_STATE": self.ctx.state_dir,
            }
        )

        def lookup(kind: str) -> Callable[[str], Obj | None]:
            return lambda name: self.ctx.api.get_or_none(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")

        try:
            env = container_env(pod, r.spec, base, lookup("secrets"), lookup("configmaps"))
            argv = command_line(r.spec, env)
            mounts = self.volumes.mounts(r.spec)
        except ConfigError as e:
            if r.view.waiting_message != str(e):
                emit(self.ctx.api, pod, "Failed", f"Error: {e}", warning=True)
            r.view.terminated = None
            r.view.waiting_reason = "CreateContainerConfigError"
            r.view.waiting_message = str(e)
            return
        r.start(argv, env, mounts, r.spec.get("workingDir") or self.ctx.cwd)
        r.view.waiting_message = ""
        emit(self.ctx.api, pod, "Started", f"Started container {r.name}")
        log.info(
            "pod %s/%s: started %s (pid %s) on %s", self.ns, self.pod_name, r.name, r.view.pid, self.pod_ip
        )

    def _report(self, pod: Obj) -> None:
        if not pod.get("status", {}).get("podIP"):
            # The IP goes out first so downward-API env and files can see it before anything starts.
            status: Obj = {
                "podIP": self.pod_ip,
                "podIPs": [{"ip": self.pod_ip}],
                "hostIP": self.ctx.host_ip,
                "hostIPs": [{"ip": self.ctx.host_ip}],
                "startTime": self.start_time,
                "phase": "Pending",
            }
            updated = self.ctx.api.strategic_patch(
                f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status", {"status": status}
            )
            self.update(updated)
            return
        status = compute_status(
            pod,
            [r.view for r in self.init],
            [r.view for r in self.main],
            self.init_done,
            self.pod_ip,
            self.ctx.host_ip,
            self.start_time,
            utcnow(),
        )
        key = strip_times(status)
        if key == self.last_sent and self._conditions_hold(pod, status):
            return
        self.ctx.api.strategic_patch(
            f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status", {"status": status}
        )
        self.last_sent = key

    @staticmethod
    def _conditions_hold(pod: Obj, status: Obj) -> bool:
        """Our conditions as last sent are still what the pod shows (nobody overwrote them)."""
        cur = {c["type"]: c.get("status") for c in pod.get("status", {}).get("conditions") or []}
        return all(cur.get(c["type"]) == c["status"] for c in status["conditions"])
