"""Where does an updated, compiled vLLM engine differ from a fresh one? (issue #16 diagnosis)

On a one-GPU device machine with vLLM installed (bench/vllm_gpu_install.sh), from the repo root:

    python3 bench/vllm_gpu_diag.py --out $OUT

Builds a Qwen3-shaped random checkpoint (base) and two variants, then runs vLLM engines in
subprocesses (one engine each, offline `LLM`, TP=1, tokenizer-free prompts):
- "fresh" engines on each checkpoint, compiled (vLLM's default: torch.compile + CUDA graphs,
  FULL_AND_PIECEWISE) and eager: the references;
- one compiled "serve" engine started on base and updated in place with the worker's
  `reload_weights(weights_iterator=..., is_checkpoint_format=True)` (the same layerwise reload the
  transfer engine runs through start/update/finish_weight_update), then with other variants of the
  update, each followed by greedy generation with logprobs;
- one eager "serve" engine doing the same.
After every step it records the greedy tokens and logprobs of every prompt, and a digest + data
pointer of every tensor reachable from the model (parameters, buffers, plain tensor attributes of
modules and of their quant_method / impl objects), and compares them with the fresh engine on the
same checkpoint. Prints one line per comparison and writes everything to $OUT/diag.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_LENGTHS = (5, 12, 17, 33, 40, 64, 3, 24)
MAX_TOKENS = 16
SHAPES = {
    # ~1.3 GB: the 16-layer model of the issue's first report
    "small": dict(layers=16, hidden=1536, intermediate=4608, heads=16, kv_heads=8, head_dim=128, vocab=32768),
    "tiny": dict(layers=2, hidden=512, intermediate=1536, heads=8, kv_heads=4, head_dim=64, vocab=8192),
    "qwen3-8b": dict(
        layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936
    ),
}


# -- checkpoints --------------------------------------------------------------------------------


def write_model(out: Path, shape: dict[str, int], seed: int, base: Path | None = None) -> Path:
    """A Qwen3 checkpoint with plausible random values (std 0.02 linears, norms near 1). With `base`,
    each tensor is base + noise of half its spread (a distinct model, same layout)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    h, i, nh, nkv, hd, v = (
        shape[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")
    )
    defs: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(shape["layers"]):
        p = f"model.layers.{layer}."
        defs |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * hd, h),
            p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h),
            p + "self_attn.o_proj.weight": (h, nh * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    base_tensors: dict[str, Any] = {}
    if base is not None:
        for f in sorted(base.glob("*.safetensors")):
            base_tensors |= load_file(f)
    names = sorted(defs)
    shard_bytes = 2 << 30
    shard: dict[str, Any] = {}
    shard_files: list[list[str]] = [[]]
    size = 0
    shards: list[dict[str, Any]] = []
    for name in names:
        shp = defs[name]
        is_norm = len(shp) == 1
        if name in base_tensors:
            b = base_tensors[name].to(dev, torch.float32)
            spread = 0.1 if is_norm else float(b.std())
            t = b + torch.randn(shp, generator=g, device=dev) * (0.5 * spread)
        elif is_norm:
            t = 1.0 + 0.1 * torch.randn(shp, generator=g, device=dev)
        else:
            t = 0.02 * torch.randn(shp, generator=g, device=dev)
        t = t.to(torch.bfloat16).cpu()
        n = t.numel() * 2
        if shard and size + n > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += n
    shards.append(shard)
    weight_map = {}
    for k, s in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(s, fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": hd,
        "vocab_size": v,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "done").write_text("")
    del shard_files
    return out


def prompts(vocab: int) -> list[list[int]]:
    import random

    r = random.Random(1234)
    return [[r.randrange(2, min(vocab, 30000)) for _ in range(n)] for n in PROMPT_LENGTHS]


# -- inside the engine process -------------------------------------------------------------------


def _tensor_record(t: Any) -> dict[str, Any]:
    import torch

    rec: dict[str, Any] = {"dtype": str(t.dtype), "shape": list(t.shape), "device": str(t.device)}
    if t.is_meta:
        rec["meta"] = True
        return rec
    rec["ptr"] = t.data_ptr()
    data = t.detach().contiguous()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if data.numel() else b""
    rec["sha1"] = hashlib.sha1(raw).hexdigest()[:16]
    return rec


def state_digest(worker: Any) -> dict[str, Any]:
    """Every tensor reachable from the model: parameters, buffers and plain tensor attributes of each
    module and of its quant_method / impl helpers (where derived state could hide)."""
    import torch
    from hotswap_engine.inference import graph_safety

    model = worker.model_runner.get_model()
    out: dict[str, Any] = {}
    # tensors the model runner keeps (and objects it holds, one level down): pointers only, their
    # contents change every step; a moved pointer there would also break captured graphs
    runner = worker.model_runner
    for n, val in vars(runner).items():
        objs = [(n, val)] + (
            [(f"{n}.{k}", v) for k, v in vars(val).items()]
            if hasattr(val, "__dict__") and not isinstance(val, torch.nn.Module)
            else []
        )
        for name, v in objs:
            if isinstance(v, torch.Tensor) and not v.is_meta:
                out[f"<runner>{name}"] = {"kind": "runner", "ptr": v.data_ptr(), "shape": list(v.shape)}
    # the same tensors graph_safety guards across an apply
    for name, slot in graph_safety.snapshot(model).items():
        out[name] = {"kind": slot.kind, **_tensor_record(slot.tensor)}
    return out


def _weights(path: str, device: Any) -> Any:
    from safetensors.torch import load_file

    for f in sorted(Path(path).glob("*.safetensors")):
        yield from sorted(load_file(str(f), device=str(device)).items())


def _device(worker: Any) -> Any:
    import torch

    dev = getattr(worker, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device(worker.model_runner.device)


def reload_layerwise(worker: Any, path: str, sync: bool) -> float:
    """vLLM's layerwise reload from an iterator of GPU tensors (what the transfer engine runs)."""
    import torch

    t0 = time.perf_counter()
    worker.reload_weights(weights_iterator=_weights(path, _device(worker)), is_checkpoint_format=True)
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def reload_guarded(worker: Any, path: str) -> list[str]:
    """The reload inside hotswap_engine.inference.graph_safety's snapshot/restore (what the transfer engine
    does): tensors the reload replaced go back onto their original storage."""
    import torch
    from hotswap_engine.inference import graph_safety

    slots = graph_safety.snapshot(worker.model_runner.get_model())
    worker.reload_weights(weights_iterator=_weights(path, _device(worker)), is_checkpoint_format=True)
    report = graph_safety.restore(slots)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (
        report.restored + [f"CHANGED:{n}" for n in report.changed] + [f"REMOVED:{n}" for n in report.removed]
    )


def load_direct(worker: Any, path: str) -> float:
    """The model's own weight loaders straight into the live parameters (no layerwise machinery)."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        worker.model_runner.get_model().load_weights(_weights(path, _device(worker)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def engine_info(worker: Any) -> dict[str, Any]:
    cfg = worker.vllm_config.compilation_config
    return {
        "compilation_mode": str(getattr(cfg, "mode", getattr(cfg, "level", None))),
        "cudagraph_mode": str(getattr(cfg, "cudagraph_mode", None)),
        "runner": type(worker.model_runner).__module__ + "." + type(worker.model_runner).__name__,
        "attn_backend": str(getattr(worker.model_runner, "attn_backend", None)),
    }


def run_engine(
    role: str, model: str, kwargs: dict[str, Any], steps: list[dict[str, Any]], vocab: int
) -> dict[str, Any]:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    memory: dict[str, Any] = (
        # an explicit KV size: many engines share the GPU, none sizes itself from free memory
        {
            "gpu_memory_utilization": float(os.environ.get("DIAG_GPU_UTIL", "0.05")),
            "kv_cache_memory_bytes": 512 << 20,
        }
        if torch.cuda.is_available()
        else {"kv_cache_memory_bytes": 64 << 20}
    )
    llm = LLM(
        model=model, skip_tokenizer_init=True, max_model_len=512, max_num_seqs=16, seed=0, **memory, **kwargs
    )
    start_s = time.perf_counter() - t0
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1, detokenize=False
    )
    ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(vocab)]

    def generate(reset: bool = True) -> list[dict[str, Any]]:
        if reset:
            llm.reset_prefix_cache()
        outs = llm.generate(ps, params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs or [], strict=False)]
            res.append({"tokens": list(c.token_ids), "logprobs": lps})
        return res

    result: dict[str, Any] = {"role": role, "model": model, "kwargs": kwargs, "start_s": round(start_s, 1)}
    result["info"] = llm.collective_rpc(engine_info)[0]
    result["steps"] = []
    for step in steps:
        rec: dict[str, Any] = {"name": step["name"]}
        op = step.get("op")
        try:
            _run_op(llm, op, step, rec)
        except Exception as e:  # a variant that cannot run here (e.g. direct loads into CPU-prepacked layers)
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {role}: step {step['name']} failed: {rec['error']}", flush=True)
            result["steps"].append(rec)
            continue
        rec["outputs"] = generate(reset=step.get("reset", True))
        if step.get("again"):
            rec["outputs_again"] = generate()
        rec["state"] = llm.collective_rpc(state_digest)[0]
        result["steps"].append(rec)
        print(f"  {role}: step {step['name']} done", flush=True)
    return result


def _run_op(llm: Any, op: str | None, step: dict[str, Any], rec: dict[str, Any]) -> None:
    if op == "reload":
        rec["seconds"] = llm.collective_rpc(reload_layerwise, args=(step["path"], step.get("sync", False)))[0]
    elif op == "direct":
        rec["seconds"] = llm.collective_rpc(load_direct, args=(step["path"],))[0]
    elif op == "guarded":
        rec["restored"] = llm.collective_rpc(reload_guarded, args=(step["path"],))[0]


# -- driver --------------------------------------------------------------------------------------


def compare_outputs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    first_diff = []
    max_lp = 0.0
    for x, y in zip(a, b, strict=True):
        d = next((k for k, (s, t) in enumerate(zip(x["tokens"], y["tokens"], strict=True)) if s != t), None)
        first_diff.append(d)
        n = d if d is not None else len(x["tokens"])
        for k in range(n):
            max_lp = max(max_lp, abs(x["logprobs"][k] - y["logprobs"][k]))
    return {
        "equal": all(d is None for d in first_diff) and max_lp == 0.0,
        "first_token_diff": first_diff,
        "max_logprob_diff": max_lp,
    }


def compare_state(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    differ = sorted(
        n for n in a.keys() & b.keys() if a[n].get("sha1") != b[n].get("sha1") and not n.endswith("kv_cache")
    )
    return {
        "differ": differ[:50],
        "n_differ": len(differ),
        "only_updated": sorted(a.keys() - b.keys())[:20],
        "only_fresh": sorted(b.keys() - a.keys())[:20],
    }


def moved_pointers(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(n for n in before.keys() & after.keys() if before[n].get("ptr") != after[n].get("ptr"))[:50]


CONFIGS: dict[str, dict[str, Any]] = {
    # vLLM's default on GPU: torch.compile (AOT-compiled when torch >= 2.10) + FULL_AND_PIECEWISE graphs
    "default": {},
    "no-aot": {"env": {"VLLM_USE_AOT_COMPILE": "0"}},
    "piecewise": {"kwargs": {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}},
    "no-graphs": {"kwargs": {"compilation_config": {"cudagraph_mode": "NONE"}}},
    "eager": {"kwargs": {"enforce_eager": True}},
}


def serve_steps(config: str, base: Path, new: Path) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [
        {"name": "start", "model": base.name},
        {"name": "reload-new", "op": "reload", "path": str(new), "model": new.name, "again": True},
        {"name": "reload-base", "op": "reload", "path": str(base), "model": base.name},
        {"name": "reload-new-sync", "op": "reload", "path": str(new), "sync": True, "model": new.name},
    ]
    if config == "default":
        steps += [
            {"name": "no-prefix-reset", "model": new.name, "reset": False},
            {"name": "reload-base-2", "op": "reload", "path": str(base), "model": base.name},
            {"name": "guarded-new", "op": "guarded", "path": str(new), "model": new.name},
            {"name": "guarded-base", "op": "guarded", "path": str(base), "model": base.name},
            {"name": "direct-new", "op": "direct", "path": str(new), "model": new.name},
        ]
    return steps


class Run:
    """One engine subprocess (fresh reference or served engine) of one configuration."""

    def __init__(
        self, args: argparse.Namespace, config: str, role: str, model: Path, steps: list[Any]
    ) -> None:
        self.config, self.role, self.model, self.steps = config, role, model, steps
        tag = f"{config}-{role}-{model.name}"
        self.out = args.work / f"{tag}.json"
        self.log = args.out / f"{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = time.perf_counter()
        if role == "fresh" and args.reuse and self.out.exists():
            return
        self.out.unlink(missing_ok=True)
        cfg = CONFIGS[config]
        spec = {"role": role, "model": str(model), "steps": steps, "vocab": args.vocab, "out": str(self.out)}
        spec["kwargs"] = cfg.get("kwargs", {})
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1", **cfg.get("env", {}))
        # every engine compiles from scratch (own cache): no engine reuses another's compiled artifacts
        env["VLLM_CACHE_ROOT"] = str(args.work / "cache" / tag)
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--engine", json.dumps(spec)],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def result(self) -> dict[str, Any] | None:
        if self.proc is not None:
            rc = self.proc.wait()
            print(
                f"{self.config} {self.role} {self.model.name}: rc={rc} {time.perf_counter() - self.t0:.0f}s"
            )
        if not self.out.exists():
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            print(f"--- {self.config} {self.role} {self.model.name} failed:\n{tail}", flush=True)
            return None
        return dict(json.loads(self.out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vllm-diag"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ",".join(CONFIGS))
    ap.add_argument("--reuse", action="store_true", help="reuse fresh engines' results from --work")
    args = ap.parse_args()
    if args.engine:
        spec = json.loads(args.engine)
        res = run_engine(spec["role"], spec["model"], spec["kwargs"], spec["steps"], spec["vocab"])
        Path(spec["out"]).write_text(json.dumps(res))
        return 0
    assert args.out is not None
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    args.vocab = shape["vocab"]
    t0 = time.perf_counter()
    base = write_model(args.work / f"{args.shape}-base", shape, 0)
    new = write_model(args.work / f"{args.shape}-new", shape, 1, base=base)
    print(f"checkpoints in {time.perf_counter() - t0:.0f}s", flush=True)
    configs = [c for c in args.configs.split(",") if c]
    # every engine at once: they are independent processes, and compiling is CPU-bound
    runs: dict[tuple[str, str, str], Run] = {}
    for c in configs:
        for m in (base, new):
            runs[(c, "fresh", m.name)] = Run(args, c, "fresh", m, [{"name": "start"}])
        runs[(c, "serve", base.name)] = Run(args, c, "serve", base, serve_steps(c, base, new))
    # a second fresh engine on the same checkpoint: do two processes agree at all?
    runs[(configs[0], "fresh2", new.name)] = Run(args, configs[0], "fresh2", new, [{"name": "start"}])
    results = {k: r.result() for k, r in runs.items()}
    report_fresh: list[dict[str, Any]] = []
    f1, f2 = results[(configs[0], "fresh", new.name)], results[(configs[0], "fresh2", new.name)]
    if f1 is not None and f2 is not None:
        c = compare_outputs(f1["steps"][0]["outputs"], f2["steps"][0]["outputs"])
        report_fresh.append({"config": configs[0], "fresh_vs_fresh2": new.name, "outputs": c})
        print(f"DIAG {configs[0]:10s} fresh vs fresh2 on {new.name}: equal={c['equal']} {c}", flush=True)

    report: dict[str, Any] = {"shape": args.shape, "results": [], "info": {}, "fresh_vs_fresh": report_fresh}
    for c in configs:
        served = results[(c, "serve", base.name)]
        refs = {m.name: results[(c, "fresh", m.name)] for m in (base, new)}
        if served is None or any(r is None for r in refs.values()):
            report["results"].append({"config": c, "error": "an engine failed (see its log)"})
            continue
        report["info"][c] = served["info"]
        start_state = served["steps"][0]["state"]
        for spec, rec in zip(serve_steps(c, base, new), served["steps"], strict=True):
            if "error" in rec:
                report["results"].append({"config": c, "step": spec["name"], "error": rec["error"]})
                print(f"DIAG {c:10s} {spec['name']:16s}: could not run: {rec['error']}", flush=True)
                continue
            ref = refs[spec["model"]]["steps"][0]  # type: ignore[index]
            row = {
                "config": c,
                "step": spec["name"],
                "against_fresh": spec["model"],
                "seconds": rec.get("seconds"),
                "restored": rec.get("restored"),
                "outputs": compare_outputs(rec["outputs"], ref["outputs"]),
                "state_vs_fresh": compare_state(rec["state"], ref["state"]),
                "moved_since_start": moved_pointers(start_state, rec["state"]),
            }
            if "outputs_again" in rec:
                row["outputs_again"] = compare_outputs(rec["outputs_again"], ref["outputs"])
            report["results"].append(row)
            o = row["outputs"]
            print(
                f"DIAG {c:10s} {row['step']:16s} vs fresh {spec['model']:12s}: "
                f"equal={o['equal']} first_diff={o['first_token_diff']} max_lp={o['max_logprob_diff']:.4g} "
                f"state_differ={row['state_vs_fresh']['n_differ']} {row['state_vs_fresh']['differ'][:4]} "
                f"moved={len(row['moved_since_start'])} {row['moved_since_start'][:4]}"
                + (f" again_equal={row['outputs_again']['equal']}" if "outputs_again" in row else "")
                + (
                    f" restored={len(row['restored'] or [])} {(row['restored'] or [])[:4]}"
                    if row["restored"] is not None
                    else ""
                ),
                flush=True,
            )
    (args.out / "diag.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
