"""Rollback decisions: which checkpoint comes back, and the new version's name."""

from __future__ import annotations

from typing import Any

import pytest
from hotswap_api.resources import VERSION_PATTERN, SourceRef, WeightVersion
from hotswap_cli.errors import CliError, ExitCode
from hotswap_cli.rollback import plan_rollback, rollback_root, rollback_version_name


def wv(
    version: str, path: str, phase: str = "Complete", done: str | None = "2026-01-01T00:00:00Z"
) -> WeightVersion:
    status: dict[str, Any] = {"phase": phase}
    if done is not None and phase == "Complete":
        status["completionTime"] = done
    return WeightVersion.model_validate(
        {
            "metadata": {"name": f"pool-{version}", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"poolRef": {"name": "pool"}, "version": version, "source": {"path": path}},
            "status": status,
        }
    )


@pytest.mark.parametrize(
    ("old", "existing", "expected"),
    [
        ("v1", set(), "v1-rollback-1"),
        ("v1", {"v1-rollback-1", "v1-rollback-3"}, "v1-rollback-4"),
        ("v1-rollback-2", {"v1-rollback-1", "v1-rollback-2"}, "v1-rollback-3"),
        ("v1-rollback-1-rollback-1", set(), "v1-rollback-1"),
        ("v10", {"v1-rollback-5"}, "v10-rollback-1"),  # another root's numbers do not count
        ("base", set(), "base-rollback-1"),
        ("step.200", set(), "step.200-rollback-1"),
    ],
)
def test_rollback_version_name(old: str, existing: set[str], expected: str) -> None:
    assert rollback_version_name(old, existing) == expected


def test_long_names_are_truncated_to_a_valid_version() -> None:
    import re

    old = "a" * 50 + "-" + "b" * 12  # 63 characters
    name = rollback_version_name(old, set())
    assert len(name) <= 63 and name.endswith("-rollback-1") and re.match(VERSION_PATTERN, name)
    # truncation that lands on a '-' or '.' must not leave it before the suffix
    old = "a" * 52 + ".bbbbbbbbbb"
    name = rollback_version_name(old, set())
    assert re.match(VERSION_PATTERN, name) and "--" not in name and ".-" not in name
    taken = {name}
    assert rollback_version_name(old, taken) not in taken


def test_root() -> None:
    assert rollback_root("v1-rollback-3") == "v1"
    assert rollback_root("v1") == "v1"


def test_default_target_is_newest_complete_with_another_checkpoint() -> None:
    versions = [
        wv("v1", "ck/1", done="2026-01-01T00:01:00Z"),
        wv("v2", "ck/2", done="2026-01-01T00:02:00Z"),
        wv("v3", "ck/3", phase="Failed"),
        wv("v4", "ck/4", done="2026-01-01T00:04:00Z"),
    ]
    plan = plan_rollback(versions, "v4", SourceRef(path="ck/4"), "base/model", None)
    assert (plan.from_version, plan.source.path, plan.new_version) == ("v2", "ck/2", "v2-rollback-1")


def test_default_toggles_after_a_rollback() -> None:
    versions = [
        wv("v1", "ck/1", done="2026-01-01T00:01:00Z"),
        wv("v2", "ck/2", done="2026-01-01T00:02:00Z"),
        wv("v1-rollback-1", "ck/1", done="2026-01-01T00:03:00Z"),
    ]
    # serving ck/1 again: the newest Complete version with another checkpoint is v2
    plan = plan_rollback(versions, "v1-rollback-1", None, "base/model", None)
    assert (plan.from_version, plan.new_version) == ("v2", "v2-rollback-1")


def test_manifest_is_carried_over() -> None:
    v1 = WeightVersion.model_validate(
        {
            "metadata": {"name": "pool-v1"},
            "spec": {
                "poolRef": {"name": "pool"},
                "version": "v1",
                "source": {"path": "ck/1", "sha256Manifest": "ck/1/sha.json"},
            },
            "status": {"phase": "Complete", "completionTime": "2026-01-01T00:00:00Z"},
        }
    )
    plan = plan_rollback([v1, wv("v2", "ck/2", done="2026-01-02T00:00:00Z")], "v2", None, "m", None)
    assert plan.source == SourceRef(path="ck/1", sha256_manifest="ck/1/sha.json")


def test_explicit_target() -> None:
    versions = [wv("v1", "ck/1"), wv("v2", "ck/2"), wv("v3", "ck/3", phase="Failed")]
    plan = plan_rollback(versions, "v2", None, "m", "v1")
    assert (plan.source.path, plan.new_version) == ("ck/1", "v1-rollback-1")
    with pytest.raises(CliError) as err:
        plan_rollback(versions, "v2", None, "m", "v3")
    assert err.value.code is ExitCode.USAGE and "Failed" in err.value.message
    with pytest.raises(CliError) as err:
        plan_rollback(versions, "v2", None, "m", "v9")
    assert err.value.code is ExitCode.NOT_FOUND


def test_base_target_uses_the_pool_model_path() -> None:
    plan = plan_rollback([wv("v1", "ck/1")], "v1", None, "models/base", "base")
    assert (plan.from_version, plan.source.path, plan.new_version) == (
        "base",
        "models/base",
        "base-rollback-1",
    )


def test_nothing_to_roll_back_to() -> None:
    with pytest.raises(CliError) as err:
        plan_rollback([], None, None, "m", None)
    assert err.value.code is ExitCode.NOT_FOUND and "--to base" in err.value.message
    # the only Complete version is the one being served
    with pytest.raises(CliError) as err:
        plan_rollback([wv("v1", "ck/1")], "v1", None, "m", None)
    assert err.value.code is ExitCode.NOT_FOUND


def numbered(version: str, path: str, seq: int, phase: str = "Complete") -> WeightVersion:
    """A version as the operator leaves it: numbered in creation order (`status.sequence`)."""
    v = wv(version, path, phase, done=f"2026-01-01T00:{seq:02d}:00Z")
    v.status.sequence = seq
    return v


def test_rollback_within_the_history_kept() -> None:
    # v1 and v2 were pruned (spec.versionHistoryLimit=2): v3, v4 kept, v5 served.
    kept = [numbered("v3", "ck/3", 3), numbered("v4", "ck/4", 4), numbered("v5", "ck/5", 5)]
    plan = plan_rollback(kept, "v5", SourceRef(path="ck/5"), "m", "v3", history_limit=2)
    assert (plan.from_version, plan.source.path, plan.new_version) == ("v3", "ck/3", "v3-rollback-1")
    plan = plan_rollback(kept, "v5", SourceRef(path="ck/5"), "m", None, history_limit=2)
    assert plan.from_version == "v4"


def test_rollback_beyond_the_history_names_the_oldest_version_kept() -> None:
    # Listed in no particular order; a Failed one older than the oldest Complete is not a target.
    kept = [
        numbered("v5", "ck/5", 5),
        numbered("v4", "ck/4", 4),
        numbered("v10", "ck/10", 10),
        numbered("v3", "ck/3", 3, phase="Failed"),
    ]
    with pytest.raises(CliError) as err:
        plan_rollback(kept, "v10", None, "m", "v1", history_limit=3)
    msg = err.value.message
    assert err.value.code is ExitCode.NOT_FOUND
    assert "'v1' is not in this pool's history" in msg
    assert (
        "spec.versionHistoryLimit=3" in msg and "the oldest version still kept to roll back to is 'v4'" in msg
    )
    assert "--to base" in msg
    # Nothing left but the served version: the default says where the history stands too.
    with pytest.raises(CliError) as err:
        plan_rollback([numbered("v10", "ck/10", 10)], "v10", None, "m", None, history_limit=0)
    assert "no earlier Complete version" in err.value.message
    assert "spec.versionHistoryLimit=0" in err.value.message and "'v10'" in err.value.message
    with pytest.raises(CliError) as err:
        plan_rollback([numbered("v3", "ck/3", 3, phase="Failed")], None, None, "m", "v1", history_limit=1)
    assert "none of them is Complete" in err.value.message
