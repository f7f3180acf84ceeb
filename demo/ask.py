"""Greedy completions from every Ready pod of the demo pool, straight from vLLM's OpenAI API."""

from __future__ import annotations

import json
import sys
import urllib.request

from kubernetes import client, config

PROMPT = "The quick brown fox"


def complete(ip: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        f"http://{ip}:8000/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return str(json.loads(r.read())["choices"][0]["text"])


def main() -> int:
    namespace, pool = sys.argv[1], sys.argv[2]
    config.load_kube_config()
    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"hotswap.dev/pool={pool}")
    print(f"  prompt: {PROMPT!r}")
    for p in sorted(pods.items, key=lambda p: p.metadata.name):
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        version = p.metadata.labels.get("hotswap.dev/weight-version", "?")
        text = complete(p.status.pod_ip) if ready and p.status.pod_ip else "(not ready: takes no traffic)"
        print(f"  {p.metadata.name:<28} {version:<10} {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
