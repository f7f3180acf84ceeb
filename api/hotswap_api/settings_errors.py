"""How a process reports invalid settings: shared by the operator's and the agent's settings."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_settings import SettingsError


def describe(error: ValidationError | SettingsError) -> str:
    """One line per invalid setting, without the input values (they may hold the token)."""
    if isinstance(error, SettingsError):
        return str(error)
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
        for e in error.errors(include_url=False, include_input=False)
    )
