"""`hotswap` argument parsing: typed commands out, usage errors (exit 2) with messages naming the flag."""

from __future__ import annotations

import io

import pytest
from hotswap_api.resources import Strategy
from hotswap_cli.__main__ import run
from hotswap_cli.commands import Io
from hotswap_cli.errors import CliError, ExitCode
from hotswap_cli.parsing import Publish, Rollback, Status, parse, parse_wait_timeout


def test_publish_defaults() -> None:
    cmd = parse(["publish", "pool-a", "--version", "v2", "--path", "ckpt/step-200"])
    assert isinstance(cmd, Publish)
    assert (cmd.pool, cmd.version, cmd.path, cmd.sha256_manifest) == ("pool-a", "v2", "ckpt/step-200", None)
    assert cmd.strategy is Strategy.BROADCAST and cmd.timeout == "10m"
    assert not cmd.wait.enabled and cmd.wait.timeout_s is None
    assert cmd.target.namespace is None and cmd.target.kubeconfig is None


def test_publish_all_flags() -> None:
    cmd = parse(
        [
            "publish",
            "p",
            "--version=v3.1",
            "--path=a/b",
            "--sha256-manifest=a/b/manifest.json",
            "--strategy=P2P",
            "--timeout=90s",
            "-n",
            "team",
            "--kubeconfig=/k",
            "--context=c",
            "--wait",
            "--timeout-wait=5m",
        ]
    )
    assert isinstance(cmd, Publish)
    assert (
        cmd.strategy is Strategy.P2P and cmd.timeout == "90s" and cmd.sha256_manifest == "a/b/manifest.json"
    )
    assert cmd.target.namespace == "team" and cmd.target.kubeconfig == "/k" and cmd.target.context == "c"
    assert cmd.wait.enabled and cmd.wait.timeout_s == 300.0


def test_status_and_rollback() -> None:
    st = parse(["status", "p", "-o", "json", "-n", "x"])
    assert isinstance(st, Status) and st.output == "json" and st.target.namespace == "x"
    rb = parse(["rollback", "p"])
    assert isinstance(rb, Rollback) and rb.to is None and not rb.wait.enabled
    rb = parse(["rollback", "p", "--to", "v1", "--wait", "--timeout-wait", "30"])
    assert isinstance(rb, Rollback) and rb.to == "v1" and rb.wait.timeout_s == 30.0
    rb = parse(["rollback", "p", "--to", "base"])
    assert isinstance(rb, Rollback) and rb.to == "base"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["publish", "p", "--version", "base", "--path", "x"], "reserved"),
        (["publish", "p", "--version", "V2", "--path", "x"], "--version 'V2'"),
        (["publish", "p", "--version", "v2-", "--path", "x"], "--version"),
        (["publish", "p", "--version", "v" * 64, "--path", "x"], "at most 63"),
        (["publish", "p", "--version", "v2", "--path", "/abs/x"], "relative"),
        (["publish", "p", "--version", "v2", "--path", "a/../../etc"], "'..'"),
        (
            ["publish", "p", "--version", "v2", "--path", "x", "--sha256-manifest", "/m.json"],
            "--sha256-manifest",
        ),
        (["publish", "p", "--version", "v2", "--path", "x", "--timeout", "10"], "--timeout '10'"),
        (["publish", "p", "--version", "v2", "--path", "x", "--timeout", "0s"], "longer than zero"),
        (["publish", "p", "--version", "v2", "--path", "x", "--strategy", "rsync"], "invalid choice"),
        (["publish", "p", "--version", "v2", "--path", "x", "--timeout-wait", "5"], "needs --wait"),
        (["publish", "p", "--version", "v2", "--path", "x", "--wait", "--timeout-wait", "-1"], "positive"),
        (["publish", "p", "--version", "v2", "--path", "x", "--wait", "--timeout-wait", "soon"], "duration"),
        (["publish", "p", "--path", "x"], "--version"),
        (["publish", "Pool_A", "--version", "v2", "--path", "x"], "not a valid InferencePool name"),
        (["status", "p", "-o", "yaml"], "invalid choice"),
        (["rollback", "p", "--to", "Bad"], "--to 'Bad'"),
        ([], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(CliError) as err:
        parse(argv)
    assert err.value.code is ExitCode.USAGE
    assert needle in err.value.message


def test_wait_timeout_forms() -> None:
    assert parse_wait_timeout(None) is None
    assert parse_wait_timeout("2.5") == 2.5
    assert parse_wait_timeout("1h30m") == 5400.0


def test_run_prints_one_stderr_line_and_returns_the_code() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(["publish", "p", "--version", "base", "--path", "x"], Io(out=out, err=err))
    assert code == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("hotswap: usage: --version 'base' is reserved")
    assert err.getvalue().count("\n") == 1


def test_missing_kubeconfig_is_a_usage_error(tmp_path: object) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(["status", "p", "--kubeconfig", f"{tmp_path}/nope"], Io(out=out, err=err))
    assert code == ExitCode.USAGE
    assert "does not exist" in err.getvalue()


def test_exit_codes_are_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parse(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for code in ExitCode:
        assert f"{code.value}  {code.word}" in text
