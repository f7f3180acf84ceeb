"""The agent's settings: one object, read from command-line flags and `HOTSWAP_AGENT_*` variables.

Every setting has one flag (`--collective-timeout`) and one environment variable
(`HOTSWAP_AGENT_COLLECTIVE_TIMEOUT`); a flag wins over the variable, the variable over the default
written here. Lists take repeated flags (`--allowed-root /a --allowed-root /b`) or JSON in the
variable. The bearer token is the exception: no flag (a command line is visible to every process
of the node), only `HOTSWAP_AGENT_TOKEN` or a file named by `--token-file`. The table of all
settings is in docs/settings.md.

The operator writes these flags into every engine container it injects
(`hotswap_operator.workload.engine_container`); tests/unit/test_operator_workload.py parses them
with this class. Every address is explicit configuration (tests set loopback ones); nothing is
autodetected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from hotswap_api.resources import DEFAULT_AGENT_PORT
from hotswap_api.settings_errors import describe  # noqa: F401  (re-exported for __main__)
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliApp, CliSuppress, SettingsConfigDict

ENV_PREFIX = "HOTSWAP_AGENT_"


class AgentSettings(BaseSettings):
    """Settings of `python -m hotswap_engine.agent` (the engine container of an inference pod)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        cli_prog_name="python -m hotswap_engine.agent",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,  # main() reports the error (tests parse without exiting)
    )

    pod_name: str = Field(default="local", description="name of this pod (the operator: the pod's name)")
    host: str = Field(description="address the HTTP API binds (the operator: the pod IP)")
    port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535, description="port of the HTTP API")
    token: CliSuppress[SecretStr | None] = Field(
        default=None, description="bearer token of the HTTP API (environment only; or --token-file)"
    )
    token_file: Path | None = Field(default=None, description="file holding the bearer token")
    base_checkpoint: Path = Field(
        description="what the served model was built from: the schema every version must match"
    )
    allowed_root: list[Path] = Field(
        min_length=1, description="directories checkpoints may be read from (repeat the flag)"
    )
    control_socket: Path = Field(
        default=Path("/run/hotswap/control.sock"),
        description="the launcher's private channel in the inference container",
    )
    handoff_endpoint: str = Field(
        default="ipc:///run/hotswap/handoff.sock",
        description="ZeroMQ endpoint the vLLM workers connect to (`{rank}` with several rank workers)",
    )
    workers: int = Field(
        default=1, ge=1, description="vLLM workers (tensor-parallel ranks) that take part in every hand-off"
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="cpu, or cuda for one rank worker per local GPU"
    )
    shm_dir: Path = Field(
        default=Path("/dev/shm"),
        description="where CPU hand-off slots live (shared with the inference container)",
    )
    advertise_address: str = Field(
        default="",
        description="address other group members reach this pod's rank at; unset: --host",
    )
    p2p_protocol: Literal["tcp", "rdma"] = Field(
        default="tcp", description="Mooncake protocol: tcp in tests, rdma in production"
    )
    p2p_device: str = Field(default="", description="RDMA device names for Mooncake; empty for tcp")
    collective_timeout: float = Field(
        default=60.0, gt=0, description="seconds within which a dead group member surfaces"
    )
    stage_threads: int | None = Field(
        default=None,
        ge=1,
        description="threads reading a checkpoint while staging; unset: one per core, at most 16",
    )
    stage_prefault: bool = Field(
        default=False,
        description="map every page of a fresh unpinned staging buffer on all threads before reading it",
    )
    max_status_wait: float = Field(
        default=60.0,
        gt=0,
        le=60,
        description="seconds: the longest a GET /v1/status long-poll is held open (tests shorten it)",
    )
    gpus: int | None = Field(
        default=None,
        ge=1,
        description="rank workers, one per local GPU (every pod of a group runs the same number); "
        "unset: every GPU of the container on cuda, 1 on cpu",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """The token from --token-file; the advertised address defaults to the bind address."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("token_file"):
            path = Path(data["token_file"])
            try:
                data["token"] = path.read_text().strip()
            except OSError as e:
                raise ValueError(f"token file {path}: {e.strerror}") from e
        if not data.get("advertise_address") and data.get("host"):
            data["advertise_address"] = data["host"]
        return data

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        if self.token is None or not self.token.get_secret_value():
            raise ValueError("a bearer token is required: HOTSWAP_AGENT_TOKEN or --token-file")
        if self.gpus is not None and self.gpus > 1:
            rank_endpoint(self.handoff_endpoint, self.gpus)  # raises when it cannot be split
        return self

    @property
    def bearer_token(self) -> str:
        assert self.token is not None  # _check
        return self.token.get_secret_value()

    @property
    def local_ranks(self) -> int:
        if self.gpus is not None:
            return self.gpus
        if self.device == "cuda":
            import torch

            return max(torch.cuda.device_count(), 1)
        return 1

    @property
    def rank_endpoint(self) -> str:
        """The hand-off endpoint with `{rank}` (each rank worker binds its own) when there are several."""
        return rank_endpoint(self.handoff_endpoint, self.local_ranks)


def rank_endpoint(endpoint: str, local: int) -> str:
    """`endpoint` for `local` rank workers: unchanged for one or when it has `{rank}` already; an
    ipc path gets `-{rank}` before its extension (tcp endpoints must carry `{rank}` themselves)."""
    if local == 1 or "{rank}" in endpoint:
        return endpoint
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"with {local} rank workers the hand-off endpoint needs `{{rank}}`: {endpoint}")
    head, dot, ext = endpoint.rpartition(".")
    if dot and "/" not in ext:
        return f"{head}-{{rank}}.{ext}"
    return f"{endpoint}-{{rank}}"


def load(argv: list[str] | None = None) -> AgentSettings:
    """The settings from `argv` (None: the process's arguments) and the environment; raises
    `pydantic.ValidationError` or `pydantic_settings.SettingsError` naming the offending setting."""
    return CliApp.run(AgentSettings, cli_args=argv)
