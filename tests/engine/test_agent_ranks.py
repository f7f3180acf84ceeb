"""Agents with several rank workers (`--gpus 2` on CPU: two gloo processes per agent).

1. Two pods, each an agent with two rank workers: pod A in front of a vLLM TP=2 engine (each
   TP rank's worker connects to its own rank worker's hand-off), pod B in front of the plain
   launcher (one plain receiver per rank, checked byte for byte). The group has 4 ranks; each pod
   broadcasts half of the checkpoint, dealt to its two rank workers. TP=2 answers may differ from
   TP=1 ones (reduction order), so engine A starts on v1 and serves as its own reference: after
   v2 and then v1 again through the agents, its greedy output equals this fresh engine's on v1.
2. The GPU check script on CPU (`bench/agent_gpu_check.py --device cpu --pods 2 --gpus 2 --kill`):
   broadcast between two such agents, then a rank worker SIGKILLed mid-update: the update fails in
   bounded time, the agents stay up and serve the old weights, the worker is replaced and the next
   update succeeds (all byte-exact).
3. The same script with `--membership-change` (two agents, one rank worker each): each pod applies
   a version alone at its own address and a port M, then both get the next one in a group whose
   master is pod-0 at port M, pod-0 asked last: it completes on the first attempt, in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pods import REPO, RankPod, loopback_ips, pod_env

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hotswap_testing.tiny_model import build_tiny_model, make_variant

    root = tmp_path_factory.mktemp("checkpoints")
    base = build_tiny_model(root / "v0", seed=0, shards=2)
    return {"root": root, "v1": make_variant(base, root / "v1", 1), "v2": make_variant(base, root / "v2", 2)}


@pytest.fixture(scope="module")
def pair(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RankPod]]:
    ip_a, ip_b = loopback_ips(2, first=31)
    a = RankPod("pod-a", ip_a, models["v1"], models["root"], tmp_path_factory.mktemp("poda"))
    b = RankPod("pod-b", ip_b, models["v1"], models["root"], tmp_path_factory.mktemp("podb"))
    b.plain = True
    try:
        for p in (a, b):
            p.start(collective_timeout=20)
        b.wait_up()
        a.wait_up()
        yield [a, b]
    finally:
        for p in (a, b):
            p.stop()


def _update(pods: list[RankPod], version: str, path: Path, port: int) -> None:
    from pods import group

    for i, p in enumerate(pods):
        body = {"version": version, "source": {"path": str(path)}, "part": {"index": i, "count": 2}}
        code, answer = p.api("POST", "/v1/stage", body)
        assert code == 201, answer
    ids = []
    for i, p in enumerate(pods):
        code, answer = p.api(
            "POST", "/v1/updates", {"version": version, "rank": i, "group": group(pods, port)}
        )
        assert code == 202, answer
        ids.append(answer["id"])
    for p, i in zip(pods, ids, strict=True):
        r = p.wait_update(i, timeout=300)
        assert r["stage"] == "Complete", (r, p.logs(60))
        assert r["bytes_done"] == r["bytes_total"] > 0


def test_tp2_engine_behind_an_agent_with_two_rank_workers(
    pair: list[RankPod], models: dict[str, Path]
) -> None:
    a, b = pair
    fresh_v1 = a.generate()  # engine A was started on v1: the fresh engine's answers
    _update(pair, "v2", models["v2"], 29611)
    v2_texts = a.generate()
    assert v2_texts != fresh_v1
    assert b.verify(models["v2"])["ok"]
    _update(pair, "v1b", models["v1"], 29612)
    assert a.generate() == fresh_v1  # both TP ranks got every byte of v1 (a wrong slice would show)
    assert b.verify(models["v1"])["ok"]
    for p in pair:
        st = p.status()
        assert st["serving_version"] == "v1b" and st["ready"], st


def test_rank_worker_killed_mid_update_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "agent_gpu_check.py"), "--device", "cpu", "--gpus", "2"]
    cmd += ["--pods", "2", "--shape", "mixed", "--updates", "1", "--kill", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=pod_env(), capture_output=True, text=True, timeout=1200, cwd=REPO)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("AGENT_GPU_CHECK ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(lines[-1].removeprefix("AGENT_GPU_CHECK "))
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert summary["ok"] and not failed, (failed, done.stderr[-3000:])
    names = [c["check"] for c in summary["checks"]]
    assert any("replaced" in n for n in names) and any("next update" in n for n in names), names


def test_membership_change_on_the_same_master_port_cpu(tmp_path: Path) -> None:
    """The first broadcast after a membership change, on the master port the pods' previous groups
    used (issue #15 item 5: it failed its first attempt after the collective timeout)."""
    cmd = [sys.executable, str(REPO / "bench" / "agent_gpu_check.py"), "--device", "cpu", "--gpus", "1"]
    cmd += ["--pods", "2", "--updates", "1", "--membership-change", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=pod_env(), capture_output=True, text=True, timeout=1200, cwd=REPO)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("AGENT_GPU_CHECK ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(lines[-1].removeprefix("AGENT_GPU_CHECK "))
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert summary["ok"] and not failed, (failed, done.stderr[-3000:])
    assert sum("membership change" in c["check"] for c in summary["checks"]) == 4, summary["checks"]
