"""Test hook: one pod's vLLM worker corrupts one byte of one tensor it receives (#12 item 5).

Enabled only where a test sets `HOTSWAP_TEST_CORRUPT_RECEIVED` (hotswap_engine.inference.
vllm_transfer_engine.CORRUPT_HOOK_ENV) to `hotswap_testing.corrupt_received:<path of a JSON file>`,
in a pod template of its own. The file may appear later (the test writes it when it wants one):

    {"version": "<version>", "pod_ip": "<the pod's IP>", "tensor": "<tensor name>"}

The worker reads it at each update; when the version and its pod's `POD_IP` match, the named tensor
is handed to vLLM with its first byte inverted, before the received-bytes fingerprint is taken, so
it is exactly what storage or transfer corruption would deliver.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("vllm.hotswap.test_hook")


def corrupter(spec: str, version: str) -> Callable[[str, torch.Tensor], torch.Tensor] | None:
    try:
        want = json.loads(Path(spec).read_text())
    except FileNotFoundError:
        return None
    if want.get("version") != version or want.get("pod_ip") != os.environ.get("POD_IP"):
        return None
    tensor = str(want["tensor"])
    log.warning("test hook: corrupting one byte of %s in %s", tensor, version)

    def corrupt(name: str, t: torch.Tensor) -> torch.Tensor:
        if name != tensor:
            return t
        bad = t.clone()  # the received slot is the sender's buffer: leave it alone
        raw = bad.view(-1).view(torch.uint8)
        raw[0] = raw[0] ^ 0xFF
        return bad

    return corrupt
