"""`python -m hotswap_operator`: take the leader Lease, then run the kopf operator until it is lost.

Only the Lease holder runs handlers, so two replicas never act at once (kopf's own peering needs its
own CRDs and pauses by priority; a Lease is what Kubernetes controllers use and needs nothing extra).
A replica that loses the Lease stops its handlers and exits with status 1; its Deployment restarts it
as a follower. Liveness: kopf's endpoint (`--liveness`, e.g. http://0.0.0.0:8080/healthz) answers
while the operator runs. Metrics: Prometheus text on `--metrics` (host:port).

Every address is given explicitly (flags or environment); nothing is autodetected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from hotswap_operator import handlers
from hotswap_operator.controller import Runtime
from hotswap_operator.kube import Kube
from hotswap_operator.lease import LeaderElector, LeadershipLost
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.planner import PlannerConfig
from hotswap_operator.workload import GPU_SHARING_MODES

log = logging.getLogger("hotswap_operator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hotswap_operator", description=__doc__)
    p.add_argument("--namespace", action="append", default=[], help="watch only these (default: all)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: in-cluster config")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument("--lease-name", default="hotswap-operator")
    p.add_argument("--lease-duration", type=int, default=15, help="seconds")
    p.add_argument(
        "--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    )
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument("--metrics", default=None, help="host:port for Prometheus metrics")
    p.add_argument(
        "--p2p-catch-up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="new pods read the current version from peers (Mooncake) instead of storage",
    )
    p.add_argument("--agent-timeout", type=float, default=5.0)
    p.add_argument(
        "--resync-interval",
        type=float,
        default=None,
        help="seconds: the safety-net reconcile of a pool when no event comes (default: the planner's "
        f"{PlannerConfig.active_requeue_s:g}s during a rollout, {PlannerConfig.idle_requeue_s:g}s idle); "
        "rollouts move on events, never on this timer",
    )
    p.add_argument(
        "--gpu-sharing",
        choices=GPU_SHARING_MODES,
        default=os.environ.get("HOTSWAP_ENGINE_GPU_SHARING") or "none",
        help="how the injected engine container sees the inference container's GPUs",
    )
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.resync_interval is not None and a.resync_interval <= 0:
        p.error("--resync-interval must be positive")
    return a


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    if args.resync_interval is None:
        return PlannerConfig(p2p_catch_up=args.p2p_catch_up)
    return PlannerConfig(
        p2p_catch_up=args.p2p_catch_up,
        active_requeue_s=args.resync_interval,
        idle_requeue_s=args.resync_interval,
    )


def api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()


async def run(args: argparse.Namespace) -> int:
    kube = Kube(api_client(args.kubeconfig))
    metrics = OperatorMetrics()
    kube.on_request = metrics.count_request
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        start_http_server(int(port), addr=host, registry=metrics.registry)
    elector = LeaderElector(kube, args.lease_namespace, args.lease_name, args.identity, args.lease_duration)
    log.info("%s: waiting for lease %s/%s", args.identity, args.lease_namespace, args.lease_name)
    await elector.acquire()
    log.info("%s: leading", args.identity)
    handlers.configure(
        Runtime(
            kube=kube,
            metrics=metrics,
            config=planner_config(args),
            agent_timeout_s=args.agent_timeout,
            gpu_sharing=args.gpu_sharing,
        )
    )
    stop: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    operator = asyncio.create_task(
        kopf.operator(
            standalone=True,  # no kopf peering: the Lease already guarantees a single active replica
            clusterwide=not args.namespace,
            namespaces=list(args.namespace),
            liveness_endpoint=args.liveness,
            stop_flag=stop,
        )
    )
    holder = asyncio.create_task(elector.hold())
    done, _ = await asyncio.wait({operator, holder}, return_when=asyncio.FIRST_COMPLETED)
    if holder in done:
        err = holder.exception()
        log.error("%s", err if isinstance(err, LeadershipLost) else f"lease keeper stopped: {err!r}")
        stop.set_result(True)
        await operator
        return 1
    holder.cancel()
    await operator
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
