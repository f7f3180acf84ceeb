"""The kubelet's main loop: watch pods, bind unscheduled ones, hand bound ones to pod workers."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from .events import emit
from .ipam import PodIPAllocator, parse_range
from .kubeapi import ApiError, KubeApi, load_kubeconfig
from .node import NodeAgent, NodeConfig
from .pod_worker import PodContext, PodWorker
from .scheduling import unfit_reason

Obj = dict[str, Any]
log = logging.getLogger("hotswap_kubelet")
STATE_ENV = "HOTSWAP_KUBELET_STATE"
PASS_ENV_DEFAULT = "PATH,PYTHONPATH,HOME,LANG,LC_ALL,TZ,TMPDIR,VIRTUAL_ENV"


@dataclass
class KubeletConfig:
    kubeconfig: str
    node_name: str
    state_dir: str
    log_dir: str
    pod_ip_range: str
    host_ip: str
    apiserver_host: str
    apiserver_port: int
    cpu: str
    memory: str
    gpus: int
    mount_mode: str  # namespace | symlink | auto
    pass_env: str = PASS_ENV_DEFAULT
    scheduler_names: tuple[str, ...] = ("default-scheduler",)
    backoff_max: float = 20.0
    lease_period: float = 10.0
    status_period: float = 30.0


def detect_mount_mode() -> str:
    """'namespace' when this process may create mount namespaces (root, no seccomp ban), else the
    documented 'symlink' fallback."""
    import subprocess
    import sys

    probe = (
        "import ctypes,sys;libc=ctypes.CDLL(None,use_errno=True);"
        "ok=libc.unshare(0x00020000)==0 and libc.mount(None,b'/',None,16384|262144,None)==0;"
        "sys.exit(0 if ok else 1)"
    )
    ok = subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
    return "namespace" if ok else "symlink"


def kill_leftovers(state_dir: str) -> int:
    """Kills every process carrying our state-dir marker in its environment: pod processes from an
    earlier run of this kubelet (re-adoption is not attempted: their pods' containers are started
    again and count a restart, as after a node reboot)."""
    marker = f"{STATE_ENV}={state_dir}".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


class Kubelet:
    def __init__(self, cfg: KubeletConfig) -> None:
        self.cfg = cfg
        self.api = KubeApi(load_kubeconfig(cfg.kubeconfig))
        self.node = NodeAgent(self.api, NodeConfig(cfg.node_name, cfg.host_ip, cfg.cpu, cfg.memory, cfg.gpus))
        mode = detect_mount_mode() if cfg.mount_mode == "auto" else cfg.mount_mode
        log.info("volume mounts: %s mode", mode)
        base_env = {k: os.environ[k] for k in cfg.pass_env.split(",") if k in os.environ}
        port = str(cfg.apiserver_port)
        # What the real kubelet injects for the `kubernetes` Service; here the apiserver itself,
        # since nothing routes service IPs on this machine.
        base_env.update(
            {
                "KUBERNETES_SERVICE_HOST": cfg.apiserver_host,
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{cfg.apiserver_host}:{port}",
                "KUBERNETES_PORT_443_TCP": f"tcp://{cfg.apiserver_host}:{port}",
                "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                "KUBERNETES_PORT_443_TCP_ADDR": cfg.apiserver_host,
                "KUBERNETES_PORT_443_TCP_PORT": port,
            }
        )
        self.ctx = PodContext(
            api=self.api,
            ips=PodIPAllocator(parse_range(cfg.pod_ip_range)),
            node_name=cfg.node_name,
            host_ip=cfg.host_ip,
            state_dir=cfg.state_dir,
            log_dir=cfg.log_dir,
            base_env=base_env,
            cwd=os.getcwd(),
            mount_mode=mode,
            backoff_max=cfg.backoff_max,
        )
        self.pods: dict[str, Obj] = {}  # uid -> latest object, every pod in the cluster
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # uids whose worker finalised them
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.kick = threading.Event()  # an unscheduled pod arrived: schedule now, not at the next tick

    # --- pods --------------------------------------------------------------------------------------
    def _worker_exit(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)
            self.finished.add(uid)

    def _on_pod(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(uid, None)
                w = self.workers.get(uid)
                if w is not None:
                    w.gone()
                self.finished.discard(uid)
                return
            self.pods[uid] = pod
            if not pod["spec"].get("nodeName"):
                self.kick.set()
            if pod["spec"].get("nodeName") != self.cfg.node_name or uid in self.finished:
                return
            w = self.workers.get(uid)
            if w is None:
                if self.stop.is_set():
                    return
                w = PodWorker(self.ctx, pod, self._worker_exit)
                self.workers[uid] = w
                w.start()
            else:
                w.update(pod)

    def _schedule_pending(self) -> None:
        with self.lock:
            pods = list(self.pods.values())
        bound = [p for p in pods if p["spec"].get("nodeName") == self.cfg.node_name]
        node_labels = self.node.cfg.labels()
        capacity = {"nvidia.com/gpu": self.cfg.gpus}
        for pod in pods:
            spec, meta = pod["spec"], pod["metadata"]
            if spec.get("nodeName") or meta.get("deletionTimestamp"):
                continue
            if spec.get("schedulerName", "default-scheduler") not in self.cfg.scheduler_names:
                continue
            reason = unfit_reason(pod, node_labels, capacity, bound)
            path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
            try:
                if reason:
                    cur = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
                    if cur.get("PodScheduled", {}).get("message") != reason:
                        emit(
                            self.api,
                            pod,
                            "FailedScheduling",
                            reason,
                            warning=True,
                            component="default-scheduler",
                        )
                        self.api.strategic_patch(
                            path + "/status",
                            {
                                "status": {
                                    "conditions": [
                                        {
                                            "type": "PodScheduled",
                                            "status": "False",
                                            "reason": "Unschedulable",
                                            "message": reason,
                                            "lastTransitionTime": time.strftime(
                                                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
                                            ),
                                        }
                                    ]
                                }
                            },
                        )
                    continue
                self.api.create(
                    path + "/binding",
                    {
                        "apiVersion": "v1",
                        "kind": "Binding",
                        "metadata": {"name": meta["name"], "uid": meta["uid"]},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.cfg.node_name},
                    },
                )
                # Count it at once so the next pod in this pass sees the GPUs taken.
                bound.append({**pod, "spec": {**spec, "nodeName": self.cfg.node_name}})
                log.info("bound %s/%s to %s", meta["namespace"], meta["name"], self.cfg.node_name)
                emit(
                    self.api,
                    pod,
                    "Scheduled",
                    f"Successfully assigned {meta['namespace']}/{meta['name']} to {self.cfg.node_name}",
                    component="default-scheduler",
                )
            except ApiError as e:
                if e.status not in (404, 409):
                    log.warning("scheduling %s/%s: %s", meta["namespace"], meta["name"], e)

    # --- loops ----------------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self.stop.is_set():
            try:
                listing = self.api.get("/api/v1/pods")
                seen = set()
                for pod in listing.get("items") or []:
                    seen.add(pod["metadata"]["uid"])
                    self._on_pod("ADDED", pod)
                with self.lock:
                    vanished = [p for uid, p in self.pods.items() if uid not in seen]
                for pod in vanished:
                    self._on_pod("DELETED", pod)
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    for ev in self.api.watch("/api/v1/pods", rv, timeout_seconds=60):
                        kind, obj = ev["type"], ev["object"]
                        if kind == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), str(obj.get("message")))
                        rv = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            self._on_pod(kind, obj)
                        if self.stop.is_set():
                            return
            except Exception as e:
                if not self.stop.is_set():
                    log.warning("pod watch restarts after: %s", e)
                    self.stop.wait(1.0)

    def _housekeeping_loop(self) -> None:
        next_lease = next_status = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_lease:
                    self.node.renew_lease()
                    next_lease = now + self.cfg.lease_period
                if now >= next_status:
                    self.node.report_status()
                    next_status = now + self.cfg.status_period
                self._schedule_pending()
            except Exception as e:
                log.warning("housekeeping: %s", e)
            self.kick.wait(0.5)
            self.kick.clear()

    def run(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        killed = kill_leftovers(self.cfg.state_dir)
        if killed:
            log.info("killed %d pod processes left by an earlier run", killed)
        self.node.register()
        threads = [
            threading.Thread(target=self._watch_loop, name="watch", daemon=True),
            threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True),
        ]
        for t in threads:
            t.start()
        log.info("node %s registered; pod IPs %s", self.cfg.node_name, self.cfg.pod_ip_range)
        self.stop.wait()
        self.kick.set()
        self.shutdown()

    def shutdown(self) -> None:
        """Stops every pod's processes (SIGTERM, then SIGKILL after at most 5 s). Pods stay in the
        API, as with a real kubelet that goes away."""
        self.stop.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown()
        for w in workers:
            w.join(timeout=10)
        kill_leftovers(self.cfg.state_dir)
        log.info("stopped")
