"""docs/reliability.md is generated from docs/reliability.json (the fault suite's outcomes): it must
be the rendering of the committed JSON, and the JSON must name every case of the suite's matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hotswap_testing.reliability_doc import render

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def test_reliability_doc_is_generated_from_the_outcomes() -> None:
    data = json.loads((ROOT / "docs/reliability.json").read_text())
    assert (ROOT / "docs/reliability.md").read_text() == render(data), (
        "docs/reliability.md is stale: run `make reliability-docs`"
    )


def test_the_outcomes_cover_the_whole_matrix() -> None:
    from faults import CASES, NOT_COVERED  # the suite's matrix (tests/e2e/faults.py)

    data = json.loads((ROOT / "docs/reliability.json").read_text())
    named = [c["case"] for c in data["cases"]]
    assert sorted(named) == sorted({c.id for c in (*CASES, *NOT_COVERED)}), "regenerate docs/reliability.json"
    for c in data["cases"]:
        if c["outcome"] == "not covered":
            assert c["message"], f"{c['case']} is not covered without a reason"
        else:
            assert c["time_to_terminal_s"] is not None or not c["passed"], c
