"""Schemathesis hooks for fuzzing a real agent (tests/engine/test_agent_fuzz.py), loaded through
`SCHEMATHESIS_HOOKS=hotswap_testing.agent_fuzz_hooks`.

Generated requests name addresses the agent would contact (p2p peers' Mooncake endpoints, the
broadcast group's master, a trainer source's ranks in a stage request): every one is rewritten to a
closed loopback port before the call, so a fuzzed request fails fast and nothing leaves the machine.
Everything else reaches the agent as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

LOOPBACK = "127.0.0.1"
CLOSED_PORT = 9  # discard: nothing listens on it in tests


def to_loopback(body: Any) -> Any:
    """`body` with every peer endpoint and master address of an update request, and every trainer
    rank of a stage request's source, on loopback."""
    if not isinstance(body, dict):
        return body
    source = body.get("source")
    trainer = source.get("trainer") if isinstance(source, dict) else None
    if isinstance(trainer, dict) and isinstance(trainer.get("parts"), list):
        for part in trainer["parts"]:
            if isinstance(part, dict) and isinstance(part.get("endpoint"), str):
                part["endpoint"] = f"{LOOPBACK}:{CLOSED_PORT}"
    peers = body.get("peers")
    if isinstance(peers, list):
        for peer in peers:
            source = peer.get("source") if isinstance(peer, dict) else None
            if isinstance(source, dict) and isinstance(source.get("endpoint"), str):
                source["endpoint"] = f"{LOOPBACK}:{CLOSED_PORT}"
    group = body.get("group")
    if isinstance(group, dict):
        if isinstance(group.get("master_addr"), str):
            group["master_addr"] = LOOPBACK
        for member in group.get("members") or ():
            if isinstance(member, dict) and isinstance(member.get("address"), str):
                member["address"] = LOOPBACK
    return body


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    case.body = to_loopback(case.body)
