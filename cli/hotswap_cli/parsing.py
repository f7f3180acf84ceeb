"""Command-line parsing: argparse, then checks that turn the arguments into one typed command.

Pure (no I/O): everything the apiserver would also reject (a bad version name, an absolute or
escaping path, a malformed duration) is refused here first with a message naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import NoReturn

from hotswap_api.labels import BASE_VERSION
from hotswap_api.resources import (
    DURATION_PATTERN,
    VERSION_PATTERN,
    Strategy,
    parse_duration,
)

from hotswap_cli.errors import CliError, ExitCode

EXIT_CODES = """exit codes:
  0  ok         done (publish --wait / rollback --wait: the rollout is Complete)
  1  failed     the rollout ended Failed or Superseded (reason on stderr)
  2  usage      bad arguments, or input the cluster rejected (e.g. a version that exists already)
  3  not-found  the pool or version does not exist, or there is nothing to roll back to
  4  timeout    --wait gave up first (the rollout itself continues)
  5  api        the cluster is unreachable or the identity lacks a permission
Errors are one stderr line: "hotswap: <failed|usage|not-found|timeout|api>: <message>".
"""

_ESCAPE = re.compile(r"(^|/)[.][.](/|$)")
# Kubernetes object names (the pool): DNS labels, at most 63 characters (the CRD enforces 63).
_POOL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Target:
    kubeconfig: str | None
    context: str | None
    namespace: str | None  # None: the context's namespace, else "default"


@dataclass(frozen=True)
class Wait:
    enabled: bool
    timeout_s: float | None  # None: the WeightVersion's own timeout plus a grace period


@dataclass(frozen=True)
class Publish:
    target: Target
    pool: str
    version: str
    path: str
    sha256_manifest: str | None
    strategy: Strategy
    timeout: str
    wait: Wait


@dataclass(frozen=True)
class Status:
    target: Target
    pool: str
    output: str  # "table" or "json"


@dataclass(frozen=True)
class Rollback:
    target: Target
    pool: str
    to: str | None  # None: the newest Complete version before the current one; "base": the base checkpoint
    strategy: Strategy
    timeout: str
    wait: Wait


Command = Publish | Status | Rollback


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are CliError(USAGE): one stderr format for every error."""

    def error(self, message: str) -> NoReturn:
        raise CliError(ExitCode.USAGE, f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-n", "--namespace", help="namespace of the pool (default: the context's, else default)"
    )
    common.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    common.add_argument("--context", help="kubeconfig context (default: the current one)")

    rollout = _Parser(add_help=False)
    rollout.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        default=Strategy.BROADCAST.value,
        help=f"default: {Strategy.BROADCAST.value}",
    )
    rollout.add_argument(
        "--timeout", default="10m", help="how long the rollout may take, e.g. 90s, 10m (default 10m)"
    )
    rollout.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    rollout.add_argument(
        "--timeout-wait",
        metavar="S",
        help="give up waiting after S seconds (or a duration like 5m); default: --timeout plus 60 s",
    )

    p = _Parser(
        prog="hotswap",
        description="Publish new weights to hotswap InferencePools and follow their rollouts.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{publish,status,rollback}")

    pub = sub.add_parser(
        "publish",
        parents=[common, rollout],
        help="create a WeightVersion: serve a new checkpoint on every pod of a pool",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pub.add_argument("pool", help="InferencePool name")
    pub.add_argument("--version", required=True, help="new version name (lowercase, digits, '-', '.')")
    pub.add_argument("--path", required=True, help="checkpoint path relative to the pool's checkpoint volume")
    pub.add_argument(
        "--sha256-manifest", help="JSON manifest {files: {name: sha256}}, relative to the volume"
    )

    st = sub.add_parser(
        "status",
        parents=[common],
        help="the pool's versions and a table of its pods",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument("pool", help="InferencePool name")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")

    rb = sub.add_parser(
        "rollback",
        parents=[common, rollout],
        help="publish an earlier Complete version's checkpoint again, as a new version",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rb.add_argument("pool", help="InferencePool name")
    rb.add_argument(
        "--to",
        metavar="VERSION",
        help=f"version to return to (default: the newest Complete one before the current; "
        f"'{BASE_VERSION}': the pool's base checkpoint)",
    )
    return p


def _usage(message: str) -> CliError:
    return CliError(ExitCode.USAGE, message)


def check_pool(name: str) -> str:
    if len(name) > 63 or not _POOL.match(name):
        raise _usage(f"pool {name!r}: not a valid InferencePool name (lowercase DNS label, at most 63)")
    return name


def check_version(version: str, flag: str = "--version") -> str:
    if version == BASE_VERSION:
        raise _usage(f"{flag} {BASE_VERSION!r} is reserved for the pool's base checkpoint")
    if len(version) > 63 or not re.match(VERSION_PATTERN, version):
        raise _usage(
            f"{flag} {version!r}: use at most 63 lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return version


def check_relative_path(path: str, flag: str) -> str:
    if not path or len(path) > 1024:
        raise _usage(f"{flag}: give a path of 1 to 1024 characters")
    if path.startswith("/"):
        raise _usage(f"{flag} {path!r} must be relative to the pool's checkpoint volume (no leading '/')")
    if _ESCAPE.search(path):
        raise _usage(f"{flag} {path!r} must not contain '..'")
    return path


def check_duration(text: str, flag: str) -> str:
    if not re.fullmatch(DURATION_PATTERN, text):
        raise _usage(f"{flag} {text!r}: expected a duration such as 90s, 10m or 1h30m")
    if parse_duration(text) <= 0:
        raise _usage(f"{flag} must be longer than zero")
    return text


def parse_wait_timeout(text: str | None) -> float | None:
    """Seconds for --timeout-wait: a number of seconds or a duration (5m)."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = parse_duration(check_duration(text, "--timeout-wait"))
    if not seconds > 0:
        raise _usage("--timeout-wait must be a positive number of seconds")
    return seconds


def to_command(ns: argparse.Namespace) -> Command:
    target = Target(kubeconfig=ns.kubeconfig, context=ns.context, namespace=ns.namespace)
    pool = check_pool(ns.pool)
    if ns.command == "status":
        return Status(target=target, pool=pool, output=ns.output)
    wait = Wait(enabled=ns.wait, timeout_s=parse_wait_timeout(ns.timeout_wait))
    if ns.timeout_wait is not None and not ns.wait:
        raise _usage("--timeout-wait needs --wait")
    timeout = check_duration(ns.timeout, "--timeout")
    strategy = Strategy(ns.strategy)
    if ns.command == "publish":
        return Publish(
            target=target,
            pool=pool,
            version=check_version(ns.version),
            path=check_relative_path(ns.path, "--path"),
            sha256_manifest=(
                check_relative_path(ns.sha256_manifest, "--sha256-manifest") if ns.sha256_manifest else None
            ),
            strategy=strategy,
            timeout=timeout,
            wait=wait,
        )
    to = ns.to
    if to is not None and to != BASE_VERSION:
        check_version(to, "--to")
    return Rollback(target=target, pool=pool, to=to, strategy=strategy, timeout=timeout, wait=wait)


def parse(argv: list[str] | None) -> Command:
    """The command, or CliError(USAGE); --help prints and exits 0 through SystemExit, as usual."""
    return to_command(build_parser().parse_args(argv))
