"""The operator's and the agent's settings: sources, precedence, validation, defaults written once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hotswap_api import protocol
from hotswap_api.resources import DEFAULT_AGENT_PORT, DEFAULT_UPDATE_MEMORY_BUDGET, EngineSpec, parse_quantity
from hotswap_engine.agent.settings import ENV_PREFIX as AGENT_ENV
from hotswap_engine.agent.settings import AgentSettings
from hotswap_engine.agent.settings import describe as describe_agent
from hotswap_engine.agent.settings import load as load_agent
from hotswap_operator.settings import ENV_PREFIX as OPERATOR_ENV
from hotswap_operator.settings import OperatorSettings, PlannerConfig
from hotswap_operator.settings import load as load_operator
from hotswap_testing import settings_docs
from pydantic import ValidationError

AGENT_ARGS = ["--host=127.0.0.5", "--base-checkpoint=/ckpt/base", "--allowed-root=/ckpt"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith((AGENT_ENV, OPERATOR_ENV))]:
        monkeypatch.delenv(name)


def test_operator_flag_wins_over_environment_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_operator([]).stage_timeout == OperatorSettings.model_fields["stage_timeout"].default
    monkeypatch.setenv(f"{OPERATOR_ENV}STAGE_TIMEOUT", "120")
    monkeypatch.setenv(f"{OPERATOR_ENV}NAMESPACE", '["a","b"]')
    monkeypatch.setenv(f"{OPERATOR_ENV}P2P_CATCH_UP", "false")
    s = load_operator([])
    assert (s.stage_timeout, s.namespace, s.p2p_catch_up) == (120.0, ["a", "b"], False)
    s = load_operator(["--stage-timeout=30", "--namespace=c", "--p2p-catch-up"])
    assert (s.stage_timeout, s.namespace, s.p2p_catch_up) == (30.0, ["c"], True)
    # the planner takes the settings as they are: they are its config
    assert isinstance(s, PlannerConfig) and s.p2p_catch_up


def test_operator_refuses_bad_values() -> None:
    with pytest.raises(ValidationError, match="expected host:port"):
        load_operator(["--metrics=9090"])
    with pytest.raises(ValidationError, match="gpu_sharing"):
        load_operator(["--gpu-sharing=sideways"])


def test_agent_token_from_environment_or_file_never_from_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="bearer token is required"):
        load_agent(AGENT_ARGS)
    monkeypatch.setenv(f"{AGENT_ENV}TOKEN", "from-env")
    s = load_agent(AGENT_ARGS)
    assert s.bearer_token == "from-env" and "from-env" not in repr(s)
    assert (s.advertise_address, s.port) == ("127.0.0.5", DEFAULT_AGENT_PORT)
    (tmp_path / "token").write_text("from-file\n")
    assert load_agent([*AGENT_ARGS, f"--token-file={tmp_path / 'token'}"]).bearer_token == "from-file"
    with pytest.raises(ValidationError) as bad:
        load_agent([*AGENT_ARGS, "--gpus=0"])
    text = describe_agent(bad.value)
    assert text.startswith("gpus:") and "from-env" not in text
    with pytest.raises(ValidationError, match="needs `\\{rank\\}`"):
        load_agent([*AGENT_ARGS, "--gpus=2", "--handoff-endpoint=tcp://127.0.0.5:5555"])


def test_agent_environment_variables_are_the_prefixed_field_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{AGENT_ENV}TOKEN", "t")
    monkeypatch.setenv(f"{AGENT_ENV}COLLECTIVE_TIMEOUT", "7")
    monkeypatch.setenv(f"{AGENT_ENV}ALLOWED_ROOT", '["/a","/b"]')
    s = load_agent(["--host=127.0.0.5", "--base-checkpoint=/a/base"])
    assert s.collective_timeout == 7.0 and [str(r) for r in s.allowed_root] == ["/a", "/b"]


def test_defaults_the_crd_shares_with_the_agent_are_written_once() -> None:
    engine = EngineSpec()
    assert engine.port == AgentSettings.model_fields["port"].default == DEFAULT_AGENT_PORT
    assert engine.update_memory_budget == DEFAULT_UPDATE_MEMORY_BUDGET
    assert parse_quantity(DEFAULT_UPDATE_MEMORY_BUDGET) == protocol.DEFAULT_MEMORY_BUDGET_BYTES


def test_settings_table_is_fresh() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert settings_docs.main(["--check", str(doc)]) == 0, "docs/settings.md is stale: make settings-docs"
    for name in [*OperatorSettings.model_fields, *AgentSettings.model_fields]:
        assert f"| `{name}` |" in doc.read_text()
