"""The three commands: read or write the API through `Cluster`, print through `render`.

Stdout carries results (the created object's name, the status table or JSON, the rollout's outcome);
the live progress display and errors go to stderr, so `hotswap status -o json | jq` and
`v=$(hotswap publish ...)` stay clean.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from hotswap_api.labels import CREATED_BY, POOL_LABEL, ROLLBACK_OF
from hotswap_api.resources import (
    API_VERSION,
    Phase,
    SourceRef,
    Strategy,
    WeightVersion,
    parse_duration,
    weight_version_name,
)

from hotswap_cli import render
from hotswap_cli.errors import CliError, ExitCode
from hotswap_cli.kube import Cluster
from hotswap_cli.parsing import Publish, Rollback, Status, Wait
from hotswap_cli.rollback import plan_rollback

# --wait without --timeout-wait waits for the WeightVersion's own timeout plus this: the operator
# marks the version Failed at its timeout, and the display should show that verdict, not time out first.
WAIT_GRACE_S = 60.0
POLL_S = 1.0


@dataclass
class Io:
    out: TextIO
    err: TextIO
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @property
    def live(self) -> bool:
        return bool(getattr(self.err, "isatty", lambda: False)())


def weight_version_body(
    pool: str,
    namespace: str,
    version: str,
    source: SourceRef,
    strategy: Strategy,
    timeout: str,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "WeightVersion",
        "metadata": {
            "name": weight_version_name(pool, version),
            "namespace": namespace,
            "labels": {POOL_LABEL: pool},
            "annotations": {CREATED_BY: "hotswap-cli", **(annotations or {})},
        },
        "spec": {
            "poolRef": {"name": pool},
            "version": version,
            "source": source.to_api(),
            "strategy": strategy.value,
            "timeout": timeout,
        },
    }


def publish(cmd: Publish, io: Io) -> ExitCode:
    cluster = Cluster(cmd.target)
    try:
        cluster.get_pool(cmd.pool)  # a clear not-found before creating a version nobody will act on
        source = SourceRef(path=cmd.path, sha256_manifest=cmd.sha256_manifest)
        body = weight_version_body(
            cmd.pool, cluster.namespace, cmd.version, source, cmd.strategy, cmd.timeout
        )
        return _create_and_follow(cluster, cmd.pool, body, cmd.wait, cmd.timeout, io)
    finally:
        cluster.close()


def rollback(cmd: Rollback, io: Io) -> ExitCode:
    cluster = Cluster(cmd.target)
    try:
        pool = cluster.get_pool(cmd.pool)
        versions = cluster.pool_versions(cmd.pool)
        plan = plan_rollback(
            versions,
            pool.status.current_version,
            pool.status.current_source,
            pool.spec.model.path,
            cmd.to,
            pool.spec.version_history_limit,
        )
        body = weight_version_body(
            cmd.pool,
            cluster.namespace,
            plan.new_version,
            plan.source,
            cmd.strategy,
            cmd.timeout,
            {ROLLBACK_OF: plan.from_version},
        )
        io.err.write(
            f"rolling {cmd.pool} back to the checkpoint of {plan.from_version} ({plan.source.describe()}) "
            f"as version {plan.new_version}\n"
        )
        return _create_and_follow(cluster, cmd.pool, body, cmd.wait, cmd.timeout, io)
    finally:
        cluster.close()


def status(cmd: Status, io: Io) -> ExitCode:
    cluster = Cluster(cmd.target)
    try:
        pool = cluster.get_pool(cmd.pool)
        pods = cluster.pool_pods(cmd.pool)
        versions = cluster.pool_versions(cmd.pool)
    finally:
        cluster.close()
    if cmd.output == "json":
        io.out.write(json.dumps(render.status_json(pool, pods, versions), indent=2) + "\n")
    else:
        io.out.write(render.status_text(pool, pods, versions) + "\n")
    return ExitCode.OK


def _create_and_follow(
    cluster: Cluster, pool: str, body: dict[str, Any], wait: Wait, timeout: str, io: Io
) -> ExitCode:
    created = cluster.create_version(body)
    name = created.metadata["name"]
    io.out.write(f"weightversion.hotswap.dev/{name} created\n")
    io.out.flush()
    if not wait.enabled:
        return ExitCode.OK
    limit = wait.timeout_s if wait.timeout_s is not None else parse_duration(timeout) + WAIT_GRACE_S
    final = follow(lambda: cluster.get_version(name), limit, io)
    return verdict(pool, final, io)


def follow(read: Callable[[], WeightVersion], limit_s: float, io: Io) -> WeightVersion:
    """Poll until the version's phase is terminal; show progress on stderr. CliError(TIMEOUT) at limit_s."""
    start = io.clock()
    shown: tuple[Any, ...] | None = None
    while True:
        wv = read()
        elapsed = io.clock() - start
        line = render.progress_line(wv, elapsed)
        if io.live:  # one line, redrawn in place
            io.err.write(f"\r\x1b[K{line}")
        elif render.progress_key(wv) != shown:
            io.err.write(line + "\n")
        shown = render.progress_key(wv)
        io.err.flush()
        if wv.status.phase.terminal:
            if io.live:
                io.err.write("\n")
            return wv
        if elapsed >= limit_s:
            if io.live:
                io.err.write("\n")
            raise CliError(
                ExitCode.TIMEOUT,
                f"gave up waiting after {render.seconds(elapsed)}: {wv.metadata.get('name')} is still "
                f"{wv.status.phase.value} ({wv.status.updated_replicas}/{wv.status.replicas} pods updated); "
                "the rollout continues",
            )
        io.sleep(min(POLL_S, max(0.0, limit_s - elapsed)))


def verdict(pool: str, wv: WeightVersion, io: Io) -> ExitCode:
    st = wv.status
    if st.phase == Phase.COMPLETE:
        io.out.write(render.outcome_line(pool, wv) + "\n")
        return ExitCode.OK
    reason = st.message or "no message"
    if st.phase == Phase.SUPERSEDED:
        raise CliError(
            ExitCode.FAILED, f"{wv.metadata.get('name')} was superseded by a newer version: {reason}"
        )
    raise CliError(ExitCode.FAILED, f"{wv.metadata.get('name')} failed: {reason}")
