"""The operator's settings: one object, read from command-line flags and `HOTSWAP_OPERATOR_*` variables.

Every setting has exactly one flag (`--lease-duration`) and one environment variable
(`HOTSWAP_OPERATOR_LEASE_DURATION`); a flag wins over the variable, the variable over the default
written here (the only place defaults are written). Lists take repeated flags (`--namespace a
--namespace b`) or JSON in the variable (`HOTSWAP_OPERATOR_NAMESPACE='["a","b"]'`). The table of all
settings is in docs/settings.md (generated from this module: `make settings-docs`).

`chart` in a field's extra names the chart value(s) that set it (charts/hotswap/values.yaml);
tests/chart checks that each of them reaches the setting.

Pure: nothing here opens a connection; `__main__` reads the settings once and hands them (or the
part each needs) to the planner, the controller and the agent client.
"""

from __future__ import annotations

import os
import socket
from typing import Literal, get_args

from hotswap_api.settings_errors import describe  # noqa: F401  (re-exported for __main__)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

ENV_PREFIX = "HOTSWAP_OPERATOR_"
GpuSharing = Literal["none", "dra", "visibleDevices"]
GPU_SHARING_MODES: tuple[str, ...] = get_args(GpuSharing)
AGENT_COMMAND = ("python", "-m", "hotswap_engine.agent")
LAUNCHER_COMMAND = ("python", "-m", "hotswap_engine.inference.vllm_launcher")


def _chart(*values: str) -> JsonDict:
    return {"chart": list(values)}


class PlannerConfig(BaseModel):
    """The planner's part of the settings (it takes only this, so it stays pure and testable)."""

    model_config = ConfigDict(frozen=True)

    p2p_catch_up: bool = Field(
        default=True,
        description="new pods read the current version from peers (Mooncake); false: from storage",
        json_schema_extra=_chart("operator.p2pCatchUp"),
    )
    retry_backoff: float = Field(
        default=10.0, gt=0, description="seconds before a failed catch-up on a pod is tried again"
    )
    # A failed Stage or StartUpdate request (an agent's 5xx, a timeout, an unreachable agent) is
    # retried after base * 2^(attempts-1) seconds, at most max.
    action_backoff_base: float = Field(
        default=1.0, gt=0, description="seconds before a failed Stage/StartUpdate is sent again (doubling)"
    )
    action_backoff_max: float = Field(default=120.0, gt=0, description="cap of that backoff, seconds")
    # Safety nets only: a rollout moves on events (the pool's pods and versions from the watch, each
    # agent's changes from its status long-poll, a finished Stage call), and a plan that waits on
    # time (a backoff, a deadline) asks to be looked at again exactly then (`Plan.requeue_after`).
    active_requeue: float = Field(
        default=30.0,
        gt=0,
        description="seconds: safety-net reconcile of a pool during a rollout (rollouts move on events)",
    )
    idle_requeue: float = Field(
        default=60.0, gt=0, description="seconds: safety-net reconcile of an idle pool (events wake it)"
    )


def _default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class OperatorSettings(PlannerConfig, BaseSettings):
    """Everything `python -m hotswap_operator` can be told. Every address is explicit: nothing is
    autodetected. It is a `PlannerConfig`, so the planner takes it as it is."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        cli_prog_name="python -m hotswap_operator",
        cli_kebab_case=True,
        cli_implicit_flags=True,  # booleans are --x / --no-x
        cli_exit_on_error=False,  # main() reports the error (tests parse without exiting)
    )

    namespace: list[str] = Field(
        default_factory=list,
        description="watch only these namespaces (repeat the flag); empty: all",
        json_schema_extra=_chart("watchNamespaces"),
    )
    kubeconfig: str | None = Field(default=None, description="kubeconfig file; unset: the in-cluster config")
    lease_namespace: str = Field(
        default="default", description="namespace of the leader Lease (the chart: the operator's own)"
    )
    lease_name: str = Field(
        default="hotswap-operator",
        description="name of the leader Lease",
        json_schema_extra=_chart("nameOverride", "fullnameOverride"),
    )
    lease_duration: int = Field(
        default=15,
        ge=1,
        description="seconds without renewal after which another replica may take the Lease",
        json_schema_extra=_chart("leaderElection.leaseDurationSeconds"),
    )
    identity: str = Field(
        default_factory=_default_identity,
        description="holder identity in the Lease (the chart: the pod name); default: host-pid",
    )
    liveness: str | None = Field(
        default=None,
        description="kopf's liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz; unset: none",
        json_schema_extra=_chart("listenAddress", "liveness.port"),
    )
    metrics: str | None = Field(
        default=None,
        description="host:port of the Prometheus metrics server; unset: none",
        json_schema_extra=_chart("listenAddress", "metrics.enabled", "metrics.port"),
    )
    verbose: bool = Field(default=False, description="debug logging", json_schema_extra=_chart("logLevel"))
    agent_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds per HTTP call to a pod's agent (staging excepted)",
        json_schema_extra=_chart("operator.agentTimeoutSeconds"),
    )
    stage_timeout: float = Field(
        default=900.0,
        gt=0,
        description="seconds a Stage call (storage to host memory) may take",
        json_schema_extra=_chart("operator.stageTimeoutSeconds"),
    )
    gpu_sharing: GpuSharing = Field(
        default="none",
        description="how the injected engine container sees the inference container's GPUs "
        "(charts/hotswap/README.md, 'Sharing the GPUs')",
        json_schema_extra=_chart("engine.gpuSharing.mode"),
    )

    # Every apiserver call of the operator is a blocking client call in a thread: asyncio's default
    # pool has cpu_count + 4 threads (6 on 2 cores), which serialised a rollout's per-pod writes (a
    # label, a readiness gate, per pod) into waves on small machines, though they only wait on I/O.
    api_concurrency: int = Field(
        default=32, ge=1, le=256, description="apiserver requests the operator keeps in flight at most"
    )
    # A simulated fleet (the agent stand-in of the test tooling, docs/scale.md) replaces both commands; a
    # real one never needs to. The containers' args stay the operator's (the agent's flags, vLLM's).
    engine_command: list[str] = Field(
        default_factory=lambda: list(AGENT_COMMAND),
        min_length=1,
        description="command of the engine container the operator adds to each pod (the agent)",
    )
    inference_command: list[str] = Field(
        default_factory=lambda: list(LAUNCHER_COMMAND),
        min_length=1,
        description="command of the pods' inference container (the launcher: vLLM plus its control socket)",
    )

    @field_validator("metrics")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port, got {value!r}")
        return value


def load(argv: list[str] | None = None) -> OperatorSettings:
    """The settings from `argv` (None: the process's arguments) and the environment; raises
    `pydantic.ValidationError` or `pydantic_settings.SettingsError` with the offending setting."""
    return CliApp.run(OperatorSettings, cli_args=argv)
