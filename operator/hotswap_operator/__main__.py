"""`python -m hotswap_operator`: take the leader Lease, then run the kopf operator until it is lost.

Only the Lease holder runs handlers, so two replicas never act at once (kopf's own peering needs its
own CRDs and pauses by priority; a Lease is what Kubernetes controllers use and needs nothing extra).
A replica that loses the Lease stops its handlers and exits with status 1; its Deployment restarts it
as a follower. Liveness: kopf's endpoint (`--liveness`, e.g. http://0.0.0.0:8080/healthz) answers
while the operator runs. Metrics: Prometheus text on `--metrics` (host:port).

Settings: `hotswap_operator.settings` (flags and `HOTSWAP_OPERATOR_*`; table in docs/settings.md).
Every address is given explicitly; nothing is autodetected.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server
from pydantic import ValidationError
from pydantic_settings import SettingsError

from hotswap_operator import handlers
from hotswap_operator.controller import Runtime
from hotswap_operator.kube import Kube
from hotswap_operator.lease import LeaderElector, LeadershipLost
from hotswap_operator.metrics import OperatorMetrics
from hotswap_operator.settings import OperatorSettings, describe, load

log = logging.getLogger("hotswap_operator")


def api_client(kubeconfig: str | None, pool_size: int) -> client.ApiClient:
    if kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
        api = client.ApiClient()
    # As many pooled connections as threads calling (urllib3 drops the surplus otherwise). The pool
    # is created lazily from the configuration, so setting it here is in time.
    api.configuration.connection_pool_maxsize = pool_size
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = pool_size
    return api


async def run(settings: OperatorSettings) -> int:
    # The client calls run in the loop's default executor (`Kube._run`: asyncio.to_thread).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=settings.api_concurrency, thread_name_prefix="kube")
    )
    kube = Kube(api_client(settings.kubeconfig, settings.api_concurrency))
    metrics = OperatorMetrics()
    kube.on_request = metrics.count_request
    if settings.metrics:
        host, _, port = settings.metrics.rpartition(":")
        start_http_server(int(port), addr=host, registry=metrics.registry)
    identity, lease_ns, lease = settings.identity, settings.lease_namespace, settings.lease_name
    elector = LeaderElector(kube, lease_ns, lease, identity, settings.lease_duration)
    log.info("%s: waiting for lease %s/%s", identity, lease_ns, lease)
    await elector.acquire()
    log.info("%s: leading", identity)
    handlers.configure(Runtime(kube=kube, metrics=metrics, settings=settings))
    stop: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    operator = asyncio.create_task(
        kopf.operator(
            standalone=True,  # no kopf peering: the Lease already guarantees a single active replica
            clusterwide=not settings.namespace,
            namespaces=list(settings.namespace),
            liveness_endpoint=settings.liveness,
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
    try:
        settings = load(argv)
    except (ValidationError, SettingsError) as e:
        sys.exit(f"python -m hotswap_operator: invalid settings: {describe(e)}")
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
