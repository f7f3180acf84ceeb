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
