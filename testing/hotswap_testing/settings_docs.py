"""docs/settings.md from the settings classes, so the table cannot drift from the code.

    python -m hotswap_testing.settings_docs [--out docs/settings.md | --check docs/settings.md]

(`make settings-docs`; tests/unit/test_settings.py fails when the checked-in file is stale.) It lives
among the test harnesses because it needs both the operator's and the engine's package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hotswap_engine.agent import settings as agent
from hotswap_operator import settings as operator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

HEADER = """# Settings

Generated from `operator/hotswap_operator/settings.py` and `engine/hotswap_engine/agent/settings.py`
by `make settings-docs`; do not edit by hand.

Each process reads one settings object (pydantic-settings): every setting has one command-line flag
and one environment variable, the variable being the setting's name upper-cased after the process's
prefix. A flag wins over the variable, the variable over the default. Lists take the flag repeated
or JSON in the variable (`HOTSWAP_OPERATOR_NAMESPACE='["a","b"]'`); booleans take `--x` / `--no-x`
or `true` / `false`. An invalid or unknown setting stops the process at start-up with a message
naming it.
"""

OPERATOR = """
## Operator: `python -m hotswap_operator`, prefix `HOTSWAP_OPERATOR_`

The Helm chart (charts/hotswap) sets the settings that have a chart value as flags; the others can
be given with `extraArgs` or `extraEnv`. tests/chart checks that every chart value reaches its
setting.

"""

AGENT = """
## Agent: `python -m hotswap_engine.agent`, prefix `HOTSWAP_AGENT_`

The operator writes these into every engine container it injects (`workload.engine_container`):
`--pod-name` and `--host` from the downward API, the port, checkpoint paths, device, worker count
and transport settings from the InferencePool's spec, and the bearer token as `HOTSWAP_AGENT_TOKEN`
from the pool's Secret (the token has no flag: a command line is visible to every process on the
node). `--advertise-address` and `--token-file` keep their defaults there.
"""


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value = info.get_default(call_default_factory=True)
        return "`[]`" if value == [] else "host-pid"
    value = info.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _chart(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    values = extra.get("chart", []) if isinstance(extra, dict) else []
    return ", ".join(f"`{v}`" for v in values) if isinstance(values, list) else ""


def table(cls: type[BaseSettings], prefix: str, chart: bool) -> str:
    head = ["setting", "flag", "environment", "default", *(["chart value"] if chart else []), "meaning"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info in cls.model_fields.items():
        flag = "(none)" if name == "token" else f"`--{name.replace('_', '-')}`"
        cells = [f"`{name}`", flag, f"`{prefix}{name.upper()}`", _default(info)]
        if chart:
            cells.append(_chart(info))
        cells.append((info.description or "").replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def render() -> str:
    return (
        HEADER
        + OPERATOR
        + table(operator.OperatorSettings, operator.ENV_PREFIX, chart=True)
        + AGENT
        + "\n"
        + table(agent.AgentSettings, agent.ENV_PREFIX, chart=False)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hotswap_testing.settings_docs", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, help="write the document to this file (default: stdout)")
    g.add_argument("--check", type=Path, help="exit 1 when this file differs from the generated one")
    a = p.parse_args(argv)
    text = render()
    if a.check is not None:
        if not a.check.exists() or a.check.read_text() != text:
            print(f"{a.check} is stale: run `make settings-docs`", file=sys.stderr)
            return 1
        return 0
    if a.out is not None:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
