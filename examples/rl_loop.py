"""A toy RL loop that publishes its policy to the pool it samples from, every iteration, from memory.

Each iteration: ask the pool for completions of one prompt through vLLM's OpenAI API (sampled, so
they differ), score them with a toy reward (how far they follow " jumps over the lazy dog.", character
by character), take a few REINFORCE steps on the policy (a copy of the served tiny Qwen3, on CPU), publish the
new weights with the trainer SDK (no file written), wait until every replica serves them, and print
the publish-to-serve time and how the pool's greedy answer and mean reward changed.

Against the pool `make demo` leaves up (`DEMO_KEEP=1 make demo`; the cluster's kubeconfig is what
`cluster/scripts/up.sh` printed):

    export KUBECONFIG=$HOME/.cache/hotswap/run/cluster/admin.kubeconfig
    PYTHONPATH=sdk:api .venv/bin/python examples/rl_loop.py --namespace hotswap-demo --pool demo \\
        --model $HOME/.cache/hotswap/demo/checkpoints/models/base

`--model` is the checkpoint the pool started from (the policy's first weights, its tokenizer). The
pods reach this process at `--host` (127.0.0.1 on the local cluster, where pods share the host's
network; a routable address of the trainer elsewhere).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from hotswap_trainer import Publisher, PublishFailed
from kubernetes import client, config
from transformers import AutoTokenizer, Qwen3ForCausalLM

PROMPT = "The quick brown fox"
GOAL = " jumps over the lazy dog."


def reward(text: str) -> float:
    """The toy reward: how far the completion follows GOAL from its start, character by character
    (0 to 1). Dense on purpose: a random policy's samples share a first character or two with it
    now and then, which is all REINFORCE needs to get going; a reward on whole words stays at 0."""
    n = 0
    for a, b in zip(text, GOAL, strict=False):
        if a != b:
            break
        n += 1
    return n / len(GOAL)


def pool_endpoints(namespace: str, pool: str) -> list[str]:
    """The OpenAI endpoints of the pool's Ready pods (the local cluster routes no Services)."""
    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"hotswap.dev/pool={pool}")
    ready = [
        p
        for p in pods.items
        if p.status.pod_ip
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return [f"http://{p.status.pod_ip}:8000/v1" for p in sorted(ready, key=lambda p: p.metadata.name)]


def complete(base_url: str, n: int, temperature: float, max_tokens: int) -> list[str]:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        f"{base_url}/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return [str(c["text"]) for c in json.loads(r.read())["choices"]]


def reinforce(policy: Any, tok: Any, texts: list[str], rewards: list[float], steps: int, opt: Any) -> float:
    """`steps` REINFORCE steps on the sampled completions' log-likelihood given the prompt, the
    advantage being the reward normalised over the batch; returns the last loss."""
    mean = sum(rewards) / len(rewards)
    spread = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5 or 1.0
    n_prompt = len(tok(PROMPT).input_ids)
    batch = [
        (tok(PROMPT + t, return_tensors="pt").input_ids, (r - mean) / spread)
        for t, r in zip(texts, rewards, strict=True)
    ]
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = torch.tensor(0.0)
        for ids, advantage in batch:
            if advantage == 0:
                continue
            logits = policy(input_ids=ids).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[n_prompt - 1 :].sum()
            loss = loss - advantage * logp / len(batch)
        if loss.requires_grad:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="demo")
    ap.add_argument("--namespace", default="hotswap-demo")
    ap.add_argument("--model", required=True, help="the checkpoint folder the pool started from")
    ap.add_argument("--host", default="127.0.0.1", help="this process's address as the pool's pods reach it")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--samples", type=int, default=16, help="completions per iteration")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per iteration")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    config.load_kube_config()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    policy = Qwen3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # trains in fp32
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    served_dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")  # the pool's
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    run = time.strftime("%H%M%S")  # a version names one set of weights: new names every run

    with Publisher(args.pool, args.namespace, local_hostname=args.host) as pub:
        endpoints = pool_endpoints(args.namespace, args.pool)
        greedy = complete(endpoints[0], 1, 0.0, 12)[0]
        print(f"prompt {PROMPT!r}; {len(endpoints)} ready replica(s); served greedy answer {greedy!r}")
        for it in range(1, args.iterations + 1):
            endpoints = pool_endpoints(args.namespace, args.pool)
            per_replica = -(-args.samples // len(endpoints))  # spread over the replicas
            texts = [t for e in endpoints for t in complete(e, per_replica, 1.0, 8)]
            rewards = [reward(t) for t in texts]
            loss = reinforce(policy, tok, texts, rewards, args.steps, opt)
            version = f"rl-{run}-{it}"
            weights = [(n, p.detach().to(served_dtype)) for n, p in policy.state_dict().items()]
            handle = pub.publish(version, weights)
            try:
                handle.wait(300)
            except PublishFailed as e:
                raise SystemExit(f"iteration {it}: {e}") from e
            before, greedy = greedy, complete(endpoints[0], 1, 0.0, 12)[0]
            print(
                f"iter {it}: mean reward {sum(rewards) / len(rewards):.2f} over {len(texts)} samples, "
                f"loss {loss:+.3f}; published {version}, served by every replica "
                f"{handle.seconds:.2f}s after publish()\n"
                f"        greedy answer {before!r} -> {greedy!r}",
                flush=True,
            )


if __name__ == "__main__":
    main()
