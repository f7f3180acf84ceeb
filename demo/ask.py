"""Greedy completions from every Ready pod of the demo pool, straight from vLLM's OpenAI API.

With `--how`, also how each pod got the weights it serves: its agent's latest update (for a
scale-out catch-up: read peer-to-peer, how many bytes from which pod)."""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from typing import Any

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


def latest_update(namespace: str, pool: str, ip: str) -> dict[str, Any]:
    """The pod's agent's latest update (its HTTP API, with the pool's bearer token)."""
    core = client.CoreV1Api()
    token = base64.b64decode(core.read_namespaced_secret(f"{pool}-agent-token", namespace).data["token"])
    spec = client.CustomObjectsApi().get_namespaced_custom_object(
        "hotswap.dev", "v1alpha1", namespace, "inferencepools", pool
    )["spec"]
    port = (spec.get("engine") or {}).get("port", 8600)
    req = urllib.request.Request(f"http://{ip}:{port}/v1/status")
    req.add_header("Authorization", f"Bearer {token.decode()}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()).get("update") or {})


def how(u: dict[str, Any]) -> str:
    if not u:
        return "serves the checkpoint it started with"
    if u.get("mode") != "P2P":
        return f"{u['version']} by broadcast ({u['stage']})"
    peers = ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in sorted((u.get("peer_bytes") or {}).items()))
    failed = f"; gave up on {', '.join(u['peers_failed'])}" if u.get("peers_failed") else ""
    seconds = (u.get("durations") or {}).get("p2p")
    took = f" in {seconds:.2f}s" if seconds is not None else ""
    return f"{u['version']} read peer-to-peer{took} from {peers or '-'}{failed} ({u['stage']})"


def main() -> int:
    namespace, pool = sys.argv[1], sys.argv[2]
    show_how = "--how" in sys.argv[3:]
    config.load_kube_config()
    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"hotswap.dev/pool={pool}")
    print(f"  prompt: {PROMPT!r}")
    ordered = sorted(pods.items, key=lambda p: p.metadata.name)
    for p in ordered:
        ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        version = p.metadata.labels.get("hotswap.dev/weight-version", "?")
        text = complete(p.status.pod_ip) if ready and p.status.pod_ip else "(not ready: takes no traffic)"
        print(f"  {p.metadata.name:<28} {version:<10} {text!r}")
    if show_how:
        print("  how each pod got its weights (its agent's latest update):")
        for p in ordered:
            if p.status.pod_ip:
                print(f"  {p.metadata.name}: {how(latest_update(namespace, pool, p.status.pod_ip))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
