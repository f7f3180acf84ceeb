"""Readiness, liveness and startup probes: httpGet, tcpSocket and exec, with the kubelet's timing
rules (initialDelaySeconds, periodSeconds, timeoutSeconds, success/failure thresholds)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .podenv import named_port

Obj = dict[str, Any]


def run_probe(
    probe: Obj, container: Obj, pod_ip: str, env: Mapping[str, str], pid: int | None
) -> tuple[bool, str]:
    """One probe attempt: (success, message)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        hg = probe["httpGet"]
        host = hg.get("host") or pod_ip
        port = named_port(container, hg["port"])
        path = hg.get("path", "/")
        headers = {h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
        if hg.get("scheme", "HTTP").upper() == "HTTPS":
            import ssl

            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl._create_unverified_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers)
            status = conn.getresponse().status
        except OSError as e:
            return False, f"Get http://{host}:{port}{path}: {e}"
        finally:
            conn.close()
        ok = 200 <= status < 400
        return ok, "" if ok else f"HTTP probe failed with statuscode: {status}"
    if "tcpSocket" in probe:
        ts = probe["tcpSocket"]
        host = ts.get("host") or pod_ip
        port = named_port(container, ts["port"])
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            return False, f"dial tcp {host}:{port}: {e}"
        return True, ""
    if "exec" in probe:
        cmd = list(probe["exec"]["command"])
        # Run inside the container's mount namespace so the command sees its volumes.
        if pid is not None:
            cmd = ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", *cmd]
        try:
            res = subprocess.run(cmd, env=dict(env), capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, f"command timed out after {timeout}s"
        except OSError as e:
            return False, str(e)
        out = (res.stdout + res.stderr).decode(errors="replace")[-1000:]
        return res.returncode == 0, out
    return False, "probe has no handler"


@dataclass
class ProbeState:
    """Result bookkeeping of one probe of one container run (reset when the container restarts)."""

    probe: Obj
    started_at: float
    result: bool
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    last_message: str = ""
    reported: str | None = None  # the failure of this run of failures last reported (an Unhealthy event)

    @classmethod
    def new(cls, probe: Obj, started_at: float, initial: bool) -> ProbeState:
        return cls(
            probe, started_at, initial, next_at=started_at + float(probe.get("initialDelaySeconds", 0))
        )

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> bool:
        """Counts one attempt; returns whether the probe's result changed."""
        self.next_at = now + float(self.probe.get("periodSeconds", 10))
        self.last_message = message
        before = self.result
        if ok:
            self.successes += 1
            self.failures = 0
            self.reported = None
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.result = False
        return before != self.result

    def failed_run_reported(self, was_ready: bool) -> bool:
        """True when a run of failures made the result False (the ready container became not ready) or
        reached the failure threshold while the result was False from the start (the result alone does
        not change for a container that never was ready), and again whenever the failure's message
        changes during the run (e.g. connection refused, then a 404): the caller reports it then. The
        real kubelet reports every failed attempt; this keeps one event per distinct failure."""
        if self.result or self.reported == self.last_message:
            return False
        threshold = int(self.probe.get("failureThreshold", 3))
        if was_ready or self.failures >= threshold:
            self.reported = self.last_message
            return True
        return False


def monotonic() -> float:
    return time.monotonic()
