"""Level (a) of fleet verification: what each worker received against the version's manifest."""

from __future__ import annotations

from hotswap_engine.received_digests import Mismatch, mismatches

MANIFEST = {"a.weight": "bf16:2x2:01", "b.weight": "bf16:4:02"}


def test_workers_that_received_the_manifest_pass() -> None:
    workers = [{"rank": 0, "received": dict(MANIFEST)}, {"rank": 1, "received": dict(MANIFEST)}]
    assert mismatches(MANIFEST, workers) == []


def test_each_difference_names_the_rank_and_the_tensor() -> None:
    workers = [
        {"rank": 0, "received": dict(MANIFEST)},
        {"rank": 1, "received": {"a.weight": "bf16:2x2:ff", "c.weight": "x"}},
    ]
    found = mismatches(MANIFEST, workers)
    assert found == [
        Mismatch(1, "a.weight", "bf16:2x2:01", "bf16:2x2:ff"),
        Mismatch(1, "b.weight", "bf16:4:02", None),
        Mismatch(1, "c.weight", None, "x"),
    ]
    assert [str(m) for m in found] == [
        "rank 1: a.weight: received bf16:2x2:ff, the manifest has bf16:2x2:01",
        "rank 1: b.weight: not received",
        "rank 1: c.weight: received but not in the manifest",
    ]


def test_a_worker_that_reported_nothing_is_not_verified() -> None:
    assert mismatches(MANIFEST, [{"rank": 0}]) == [Mismatch(0, "*", None, None)]


def test_the_agents_check_names_rank_and_tensor_and_caps_the_list() -> None:
    from hotswap_api.resources import MAX_REPORTED_TENSORS
    from hotswap_engine.agent.verify import describe, received_check

    many = {f"t{i:02d}": "x" for i in range(MAX_REPORTED_TENSORS + 3)}
    ok = received_check("v1", many, [{"rank": 0, "received": dict(many)}])
    assert ok.received_ok and ok.received_mismatches == () and ok.received_count == 0
    bad = received_check("v1", many, [{"rank": 0, "received": {k: "y" for k in many}}])
    assert not bad.received_ok and bad.received_count == MAX_REPORTED_TENSORS + 3
    assert len(bad.received_mismatches) == MAX_REPORTED_TENSORS
    assert (bad.received_mismatches[0].rank, bad.received_mismatches[0].tensor) == (0, "t00")
    assert describe(bad).endswith("; 3 more") and "rank 0: t00" in describe(bad)


def test_processed_digest_covers_every_worker_and_reports_short_values() -> None:
    from hotswap_engine.agent.verify import processed_digest

    w0, w1 = {"tp0:a": "a" * 64}, {"tp1:a": "b" * 64}
    digest, short = processed_digest([w0, w1])
    assert short == {"tp0:a": "a" * 16, "tp1:a": "b" * 16}
    assert digest == processed_digest([w1, w0])[0]  # order-free
    assert digest != processed_digest([w0, {"tp1:a": "c" * 64}])[0]
