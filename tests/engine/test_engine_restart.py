"""A restarted inference container (killed, OOM, a crash) comes back on the base checkpoint while
Kubernetes may still route to its pod: the readiness gate says "serves the pool's version" until the
operator hears otherwise. The launcher therefore remembers the version it served and keeps
generation paused after a restart (shown with vLLM in test_vllm_launcher.py); here the agent's part,
with the plain launcher (byte-exact checks, no engine start) and a real agent:

1. only the inference container restarted: the agent sees it at its next status read (and within
   about a second while the operator's long-poll waits) and applies the version it served again from
   its host copy; the engine resumes on exactly those bytes, and the agent serves it, ready;
2. both containers restarted: the agent holds nothing to re-apply. It reports the base checkpoint,
   not ready, and leaves the engine paused (restoring the base there would resume it on weights the
   pool may not serve); the next version applied resumes it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotswap_testing.waiting import wait_for
from pods import RankPod, group, loopback_ips

pytestmark = pytest.mark.vllm  # the tier of the agent's engine tests (torch, gloo rank workers)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[RankPod]:
    from hotswap_testing.tiny_model import build_tiny_model, make_variant

    root = tmp_path / "checkpoints"
    base = build_tiny_model(root / "v0", seed=0, shards=2)
    make_variant(base, root / "v1", 1)
    make_variant(base, root / "v2", 2)
    (ip,) = loopback_ips(1, first=41)
    p = RankPod("pod-r", ip, base, root, tmp_path / "pod")
    p.plain = True
    try:
        p.start(collective_timeout=20)
        p.wait_up()
        yield p
    finally:
        p.stop()


def apply_alone(pod: RankPod, version: str, path: Path) -> None:
    """Stage and apply a version in a group of one, as the operator's catch-up does."""
    code, answer = pod.api("POST", "/v1/stage", {"version": version, "source": {"path": str(path)}})
    assert code == 201, answer
    with socket.socket() as s:
        s.bind((pod.ip, 0))
        port = s.getsockname()[1]
    body = {"version": version, "rank": 0, "group": group([pod], port, parts=False)}
    code, answer = pod.api("POST", "/v1/updates", body)
    assert code == 202, answer
    result = pod.wait_update(answer["id"], timeout=300)
    assert result["stage"] == "Complete", (result, pod.logs(60))


def launcher_health(pod: RankPod) -> dict[str, Any]:
    try:
        return pod.control("/healthz")
    except OSError:
        return {}


def restart(pod: RankPod, what: str) -> None:
    pod.kill(what)
    if what == "launcher":
        pod.start_launcher()
    else:
        pod.start_agent()


def test_only_the_engine_restarted_the_agent_applies_its_version_again(pod: RankPod) -> None:
    v1 = pod.root / "v1"
    apply_alone(pod, "v1", v1)
    restart(pod, "launcher")

    def healed() -> dict[str, Any] | None:
        st = pod.status()  # what the operator reads (every status read checks the launcher)
        h = launcher_health(pod)
        back = h.get("version") == "v1" and h.get("paused") is False
        return st if back and st["serving_version"] == "v1" and st["ready"] else None

    st = wait_for(healed, 120, "the restarted engine serving v1 again, the agent ready", lambda: pod.logs(60))
    assert st["last_error"] is None, st
    assert launcher_health(pod)["restarted_from"] is None
    assert pod.verify(v1)["ok"]  # every rank holds v1's bytes again
    assert "applying it again from host memory" in (pod.workdir / "agent.log").read_text()


def test_both_containers_restarted_the_engine_stays_paused_until_a_version_is_applied(
    pod: RankPod,
) -> None:
    apply_alone(pod, "v1", pod.root / "v1")
    pod.kill("agent")
    restart(pod, "launcher")
    pod.start_agent()
    pod.wait_up()

    def reported() -> dict[str, Any] | None:
        st = pod.status()
        return st if st["serving_version"] is None and not st["ready"] and st["engine_up"] else None

    st = wait_for(reported, 120, "the agent reporting the restarted engine: base, not ready", pod.logs)
    assert "restarted" in (st["last_error"] or ""), st
    health = launcher_health(pod)
    assert health["paused"] is True and health["restarted_from"] == "v1", health

    apply_alone(pod, "v2", pod.root / "v2")
    health = launcher_health(pod)
    assert health["paused"] is False and health["version"] == "v2", health
    assert pod.verify(pod.root / "v2")["ok"]
    st = pod.status()
    assert st["serving_version"] == "v2" and st["ready"], st
