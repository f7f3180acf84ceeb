"""Schemathesis hooks for fuzzing a real agent (tests/engine/test_agent_fuzz.py), loaded through
`SCHEMATHESIS_HOOKS=hotswap_testing.agent_fuzz_hooks`.

Generated update requests name addresses the agent would contact (p2p peers' Mooncake endpoints,
the broadcast group's master): every one is rewritten to a closed loopback port before the call,
so a fuzzed update fails fast and nothing leaves the machine. Everything else reaches the agent as
generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

LOOPBACK = "127.0.0.1"
CLOSED_PORT = 9  # discard: nothing listens on it in tests


def to_loopback(body: Any) -> Any:
    """`body` with every peer endpoint and master address of an update request on loopback."""
    if not isinstance(body, dict):
        return body
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
