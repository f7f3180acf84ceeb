"""Exit codes and the one error type every command raises; `__main__` turns it into a stderr line.

Scripts can rely on both the code and the first word after `hotswap:` on stderr:

    0  ok            the command did what it said (publish --wait: the rollout is Complete)
    1  failed        the rollout ended Failed or Superseded
    2  usage         bad arguments or input the apiserver rejected (invalid version, reused version)
    3  not-found     the pool or version does not exist (or nothing to roll back to)
    4  timeout       --wait gave up before the rollout finished (the rollout itself goes on)
    5  api           the cluster could not be reached, or the identity lacks the permission
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    API = 5

    @property
    def word(self) -> str:
        return self.name.lower().replace("_", "-")


class CliError(Exception):
    """Ends the command with `code`; the message goes to stderr as `hotswap: <word>: <message>`."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def line(self) -> str:
        return f"hotswap: {self.code.word}: {self.message}"
