"""Real vLLM on a GPU, updated by the real agent: outputs equal to a fresh engine (issue #16).

On a one-GPU device machine with vLLM 0.26 installed (bench/vllm_gpu_install.sh), from the repo root:

    PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine python3 bench/vllm_gpu_check.py --shape small --out $OUT

What runs, all as separate processes, as in a pod:
- `python -m hotswap_engine.inference.vllm_launcher` (vLLM's OpenAI server, compiled with CUDA graphs
  unless --eager, plus the control socket; the hotswap weight-transfer engine is our receiving side, as in the
  image, driven through vLLM's start_weight_update/update_weights/finish_weight_update);
- `python -m hotswap_engine.agent --device cuda --gpus 1` (HTTP API, staging into pinned memory,
  one rank worker: host→GPU, CUDA IPC hand-off into the vLLM worker).
References: a fresh launcher started on each checkpoint, same flags, queried the same way.
Checks, after every update: the greedy tokens and logprobs of every prompt (one request per prompt,
then all prompts in one request) equal the fresh engine's; every parameter's fingerprint equals the
checkpoint's (qkv/gate_up concatenated as vLLM keeps them); update time; GPU memory of the engine and
agent processes before, during (peak) and after. Then a broken update (the rank worker SIGKILLed
mid-stream): it fails, the agent rolls back, and outputs and parameters equal the previous
version's; the next update succeeds. Prints `VLLM_GPU_CHECK {json}`; exit 0 only if every check held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engine"))
sys.path.insert(0, str(REPO / "bench"))

from agent_gpu_check import control_get  # noqa: E402
from vllm_gpu_diag import MAX_TOKENS, SHAPES, prompts, write_model  # noqa: E402
from vllm_gpu_diag import compare_outputs as compare  # noqa: E402

TOKEN = "vllm-gpu-check"
ANY_VERSION = object()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer with exactly one token per id ("t0" .. "tN"): every id the random model
    emits detokenizes, and the OpenAI server runs as with a real model."""
    if (model_dir / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t0")
    fast.model_max_length = 4096
    fast.save_pretrained(model_dir)


def proc_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB per process from nvidia-smi (empty where it cannot say)."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[int, int] = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            pid, mib = (int(x) for x in line.split(","))
            out[pid] = out.get(pid, 0) + mib
    return out


class MemorySampler:
    """Peak GPU MiB of two process trees while running (nvidia-smi every ~0.1 s)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peak: dict[str, int] = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        mem = gpu_memory_by_pid()
        return {k: sum(mem.get(p, 0) for p in proc_tree(r)) for k, r in self.roots.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(0.1)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class _Process:
    """A child process logging to `self.log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def stop(self, grace: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Server(_Process):
    """One vllm_launcher process (OpenAI server + control socket)."""

    def __init__(self, name: str, model: Path, args: argparse.Namespace, util: float) -> None:
        self.name, self.model = name, model
        self.dir = args.out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.control = Path("/tmp") / f"hs-{os.getpid()}-{name}.sock"
        self.port = free_port()
        argv = [
            sys.executable,
            "-m",
            "hotswap_engine.inference.vllm_launcher",
            "--control-socket",
            str(self.control),
        ]
        argv += [str(model), "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "m"]
        argv += ["--kv-cache-memory-bytes", str(args.kv_bytes)]
        if args.device == "cuda":
            argv += ["--gpu-memory-utilization", str(util)]
        argv += ["--max-model-len", "512", "--max-num-seqs", "16", "--seed", "0"]
        if args.eager:
            argv += ["--enforce-eager"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_USE_FLASHINFER_SAMPLER="0")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "api"), str(REPO / "engine"), env.get("PYTHONPATH", "")]
        )
        self.log = self.dir / "launcher.log"
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.monotonic()

    def wait_up(self, timeout: float) -> float:
        """Seconds from the launcher's start until it serves."""
        t0 = self.t0
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: launcher exited {self.proc.returncode}\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200 and self.control.exists():
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: not up in {timeout}s\n{self.tail()}")

    def complete(self, prompt: list[list[int]] | list[int]) -> list[dict[str, Any]]:
        body = {
            "model": "m",
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "logprobs": 1,
            "ignore_eos": True,
        }
        req = urllib.request.Request(
            f"{self.url}/v1/completions", data=json.dumps(body).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=120) as r:
            data = json.loads(r.read())
        out = []
        for c in sorted(data["choices"], key=lambda c: c["index"]):
            lp = c["logprobs"]
            out.append({"tokens": lp["tokens"], "logprobs": lp["token_logprobs"]})
        return out

    def outputs(self, vocab: int) -> dict[str, list[dict[str, Any]]]:
        ps = prompts(vocab)
        return {"single": [self.complete(p)[0] for p in ps], "batch": self.complete(ps)}


class Agent(_Process):
    def __init__(self, server: Server, base: Path, root: Path, args: argparse.Namespace) -> None:
        self.dir = server.dir
        self.port = free_port()
        (self.dir / "shm").mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "hotswap_engine.agent", "--pod-name", "pod-0", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--base-checkpoint", str(base), "--allowed-root", str(root)]
        argv += ["--control-socket", str(server.control), "--device", args.device, "--gpus", "1"]
        argv += [
            "--handoff-endpoint",
            f"ipc://{self.dir}/handoff-{{rank}}.sock",
            "--shm-dir",
            str(self.dir / "shm"),
        ]
        argv += ["--collective-timeout", "20"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HOTSWAP_AGENT_TOKEN=TOKEN)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "api"), str(REPO / "engine"), env.get("PYTHONPATH", "")]
        )
        self.log = self.dir / "agent.log"
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_ready(self, version: str | object | None, timeout: float) -> dict[str, Any]:
        """Until the agent is ready and serves `version` (ANY_VERSION: whatever it serves)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}\n{self.tail()}")
            with contextlib.suppress(OSError):
                code, last = self.api("GET", "/v1/status")
                served = last.get("serving_version")
                if code == 200 and last.get("ready") and version in (ANY_VERSION, served):
                    return dict(last)
            time.sleep(0.2)
        raise TimeoutError(f"agent not ready on {version} in {timeout}s (last status {last})\n{self.tail()}")

    def stage(self, version: str, path: Path) -> float:
        t0 = time.perf_counter()
        code, body = self.api("POST", "/v1/stage", {"version": version, "source": {"path": str(path)}})
        if code != 201:
            raise RuntimeError(f"stage refused ({code}): {body}")
        return time.perf_counter() - t0

    def update(self, version: str, port: int, **extra: Any) -> str:
        group = {
            "members": [{"rank": 0, "pod": "pod-0", "address": "127.0.0.1", "part": None}],
            "master_addr": "127.0.0.1",
            "master_port": port,
        }
        code, body = self.api("POST", "/v1/updates", {"version": version, "rank": 0, "group": group, **extra})
        if code != 202:
            raise RuntimeError(f"update refused ({code}): {body}")
        return str(body["id"])

    def wait_update(self, update_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.api("GET", f"/v1/updates/{update_id}")
            if code == 200 and body["stage"] in ("Complete", "Failed"):
                return dict(body)
            time.sleep(0.02)
        raise TimeoutError(f"update {update_id} not finished in {timeout}s\n{self.tail()}")

    def rank_workers(self) -> list[int]:
        return sorted(
            p
            for p in proc_tree(self.proc.pid) - {self.proc.pid}
            if b"rank_worker" in Path(f"/proc/{p}/cmdline").read_bytes()
        )


def compare_outputs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    single, batch = compare(a["single"], b["single"]), compare(a["batch"], b["batch"])
    return {"equal": single["equal"] and batch["equal"], "single": single, "batch": batch}


def expected_fingerprints(model_dir: Path) -> dict[str, str]:
    """Fingerprints of the parameters as vLLM keeps a Qwen3 checkpoint (bf16, TP=1)."""
    import torch
    from hotswap_engine.digest import fingerprint
    from safetensors.torch import load_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tensors: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(str(f), device=dev)
    out: dict[str, str] = {}
    fused = {
        "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    }
    for name in sorted(tensors):
        done = False
        for target, parts in fused.items():
            prefix = target.split(".")[0] + "."
            for i, part in enumerate(parts):
                if name.endswith(f"{prefix}{part}.weight"):
                    done = True
                    if i == 0:
                        base = name[: -len(f"{prefix}{part}.weight")]
                        cat = torch.cat([tensors[f"{base}{prefix}{p}.weight"] for p in parts])
                        out[f"param:{base}{target}.weight"] = fingerprint(cat)
        if not done:
            out[f"param:{name}"] = fingerprint(tensors[name])
    return out


def check_params(server: Server, expected: dict[str, str]) -> dict[str, Any]:
    got = control_get(server.control, "/digests")["workers"][0]
    params = {k: v for k, v in got.items() if k.startswith("param:")}
    mismatched = sorted(k for k in expected if params.get(k) != expected[k])
    return {
        "ok": not mismatched and len(params) == len(expected),
        "params": len(params),
        "expected": len(expected),
        "mismatched": mismatched[:10],
        "n_mismatched": len(mismatched),
    }


def pinned_h2d_rate() -> float:
    """GB/s of a pinned host→GPU copy of 4 GiB (median of 5), for the one-GPU bound."""
    import torch

    n = 4 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    del host, dev
    torch.cuda.empty_cache()
    return n / times[len(times) // 2] / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument(
        "--checkpoints",
        type=int,
        default=0,
        help="how many checkpoints (default: one per update); updates cycle",
    )
    ap.add_argument(
        "--eager", action="store_true", help="enforce_eager in every engine (no compile, no graphs)"
    )
    ap.add_argument("--no-broken", action="store_true", help="skip the broken update")
    ap.add_argument("--util", type=float, default=0.15, help="gpu_memory_utilization of each engine")
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vllm-check"))
    args = ap.parse_args()
    args.kv_bytes = int(args.kv_gib * (1 << 30))
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    vocab = shape["vocab"]
    root = args.work / args.shape
    root.mkdir(parents=True, exist_ok=True)
    n_versions = args.checkpoints or 1 + args.updates + (0 if args.no_broken else 1)
    t0 = time.perf_counter()
    versions = [write_model(root / "v0", shape, 0)]
    for k in range(1, n_versions):
        versions.append(write_model(root / f"v{k}", shape, k, base=versions[0]))
    for v in versions:
        write_tokenizer(v, vocab)
    mode = "eager" if args.eager else "compiled"
    summary: dict[str, Any] = {
        "shape": args.shape,
        "mode": mode,
        "checkpoint_seconds": round(time.perf_counter() - t0, 1),
    }
    summary["checkpoint_bytes"] = sum(f.stat().st_size for f in versions[0].glob("*.safetensors"))
    checks: list[dict[str, Any]] = []
    ok = True

    def check(name: str, passed: bool, **info: Any) -> None:
        nonlocal ok
        ok = ok and passed
        checks.append({"check": name, "ok": passed, **info})
        print(json.dumps(checks[-1]), flush=True)

    # References: a fresh engine per checkpoint, several at once (same flags as the served one).
    fresh: dict[str, dict[str, Any]] = {}
    servers: list[Server] = []
    try:
        # The first engine compiles alone; every later one (fresh references and the served engine)
        # loads its compiled artifacts, so all run the same kernels. Engines compiling side by side
        # may each pick other kernels (seen with the 8B shape: outputs of two engines on the same
        # checkpoint differed before any update).
        order = [versions[:1]] + [versions[k : k + 3] for k in range(1, len(versions), 3)]
        for chunk in order:
            group = [Server(f"fresh-{v.name}", v, args, args.util) for v in chunk]
            servers += group
            for s in group:
                up = s.wait_up(900)
                fresh[s.model.name] = s.outputs(vocab)
                summary.setdefault("fresh_start_seconds", {})[s.model.name] = round(up, 1)
                summary.setdefault("fresh_outputs", {})[s.model.name] = fresh[s.model.name]
                s.stop()
        print(f"fresh references: {sorted(fresh)}", flush=True)

        if args.shape == "qwen3-8b":
            summary["pinned_h2d_GBps"] = round(pinned_h2d_rate(), 2)
        served = Server("served", versions[0], args, args.util)
        servers.append(served)
        summary["served_start_seconds"] = round(served.wait_up(900), 1)
        agent = Agent(served, versions[0], root, args)
        try:
            status = agent.wait_ready(ANY_VERSION, 600)
            base_version = status.get("serving_version")
            summary["agent_base_version"] = base_version
            sampler = MemorySampler({"engine": served.proc.pid, "agent": agent.proc.pid})
            mem_before = sampler.sample()
            out = served.outputs(vocab)
            start_out = out
            summary["served_outputs"] = {"start": out}
            check(
                "start: served engine equals a fresh engine on v0",
                compare_outputs(out, fresh["v0"])["equal"],
                diff=compare_outputs(out, fresh["v0"]),
            )
            port = free_port()
            updates: list[dict[str, Any]] = []
            served_v, served_name = versions[0], None
            for k in range(1, 1 + args.updates):
                # update k applies checkpoint k (cycling with --checkpoints), as version u<k>
                v, name = versions[k % len(versions)], f"u{k}"
                stage_s = agent.stage(name, v)
                with MemorySampler({"engine": served.proc.pid, "agent": agent.proc.pid}) as peak:
                    t1 = time.perf_counter()
                    uid = agent.update(name, port + k)
                    res = agent.wait_update(uid, 600)
                    wall = time.perf_counter() - t1
                mem_after = sampler.sample()
                out = served.outputs(vocab)
                cmp = compare_outputs(out, fresh[v.name])
                params = check_params(served, expected_fingerprints(v))
                rec = {
                    "version": name,
                    "checkpoint": v.name,
                    "stage_seconds": round(stage_s, 3),
                    "update_wall_seconds": round(wall, 3),
                    "durations": res.get("durations"),
                    "bytes": res.get("bytes_total"),
                    "gpu_mib_before": mem_before,
                    "gpu_mib_peak": peak.peak,
                    "gpu_mib_after": mem_after,
                }
                updates.append(rec)
                check(f"update {name}: Complete", res["stage"] == "Complete", error=res.get("error"), **rec)
                summary["served_outputs"][name] = out
                check(f"update {name} ({v.name}): outputs equal a fresh engine", cmp["equal"], diff=cmp)
                if v == versions[0]:
                    own = compare_outputs(out, start_out)
                    check(
                        f"update {name}: back on v0, the engine answers exactly as it did at start",
                        own["equal"],
                        diff=own,
                    )
                check(f"update {name} ({v.name}): parameters equal the checkpoint", params["ok"], **params)
                mem_before = mem_after
                served_v, served_name = v, name
            summary["updates"] = updates
            if not args.no_broken:
                v = versions[(args.updates + 1) % len(versions)]
                agent.stage("broken", v)
                total = summary["checkpoint_bytes"]
                uid = agent.update(
                    "broken",
                    port + 100,
                    max_bytes_per_second=max(total // 6, 1),
                    bucket_bytes=max(4096, total // 64 // 4096 * 4096),
                )
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    _, r = agent.api("GET", f"/v1/updates/{uid}")
                    if r["stage"] in ("Complete", "Failed") or (
                        r["stage"] == "Transferring" and r["bytes_done"] > 0
                    ):
                        break
                    time.sleep(0.01)
                victim = agent.rank_workers()
                for p in victim:
                    os.kill(p, signal.SIGKILL)
                t_kill = time.monotonic()
                res = agent.wait_update(uid, 300)
                check(
                    "broken update: Failed",
                    res["stage"] == "Failed",
                    stage_when_killed=r.get("stage"),
                    bytes_done_when_killed=r.get("bytes_done"),
                    error=res.get("error"),
                    seconds_after_kill=round(time.monotonic() - t_kill, 2),
                )
                status = agent.wait_ready(served_name, 300)
                out = served.outputs(vocab)
                cmp = compare_outputs(out, fresh[served_v.name])
                check(
                    "broken update: engine serves the previous version's outputs exactly",
                    cmp["equal"],
                    diff=cmp,
                    serving=status.get("serving_version"),
                )
                params = check_params(served, expected_fingerprints(served_v))
                check("broken update: parameters equal the previous checkpoint", params["ok"], **params)
                agent.stage("recovered", v)
                uid = agent.update("recovered", port + 101)
                res = agent.wait_update(uid, 600)
                out = served.outputs(vocab)
                cmp = compare_outputs(out, fresh[v.name])
                check(
                    "after the broken update: the next update succeeds with outputs equal a fresh engine",
                    res["stage"] == "Complete" and cmp["equal"],
                    error=res.get("error"),
                    diff=cmp,
                    durations=res.get("durations"),
                )
        finally:
            agent.stop(grace=30)
    except Exception as e:
        check("no exception", False, error=f"{type(e).__name__}: {e}")
        for s in servers:
            print(f"--- {s.name}\n{s.tail()}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    summary.update(ok=ok, checks=checks)
    (args.out / f"vllm_gpu_check-{args.shape}-{mode}.json").write_text(json.dumps(summary, indent=1))
    print("VLLM_GPU_CHECK " + json.dumps({k: v for k, v in summary.items() if k != "checks"}), flush=True)
    print(
        f"VLLM_GPU_CHECK_RESULT shape={args.shape} mode={mode} ok={ok} "
        f"passed={sum(c['ok'] for c in checks)}/{len(checks)}",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
