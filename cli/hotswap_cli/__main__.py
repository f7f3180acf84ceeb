"""`hotswap publish|status|rollback`: see `hotswap --help` and errors.py for the exit codes."""

from __future__ import annotations

import sys

from hotswap_cli import commands
from hotswap_cli.errors import CliError
from hotswap_cli.parsing import Publish, Rollback, Status, parse


def run(argv: list[str] | None = None, io: commands.Io | None = None) -> int:
    io = io or commands.Io(out=sys.stdout, err=sys.stderr)
    try:
        cmd = parse(argv)
        if isinstance(cmd, Publish):
            return commands.publish(cmd, io)
        if isinstance(cmd, Rollback):
            return commands.rollback(cmd, io)
        if isinstance(cmd, Status):
            return commands.status(cmd, io)
        raise AssertionError(cmd)
    except CliError as e:
        io.err.write(e.line() + "\n")
        return e.code
    except KeyboardInterrupt:
        io.err.write("hotswap: interrupted (a created WeightVersion keeps rolling out)\n")
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
