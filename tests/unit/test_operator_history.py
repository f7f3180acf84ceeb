"""The history window: planning over it decides what planning over every version decides, and the
book rebuilds its index only when the watch replaced an object."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from hotswap_api.resources import Phase, PodVerification, VerificationLevel, WeightVersionStatus
from hotswap_operator import history
from hotswap_operator.planner import plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_operator_planner import POOL, T0, fleet, pod, pool_spec, wv

PODS = ("llm-a", "llm-b", "llm-c")


@st.composite
def histories(draw: st.DrawFn) -> Any:
    n = draw(st.integers(0, 24))
    names = [f"v{i}" for i in range(n)]
    views = []
    for i in range(n):
        # now and then a second WeightVersion of an earlier version (a rollback re-publishes one)
        version = names[draw(st.integers(0, i))] if i and draw(st.integers(0, 9)) == 0 else names[i]
        phase = draw(st.sampled_from(list(Phase)))
        numbered = phase.terminal or draw(st.booleans())
        checked = []
        if draw(st.integers(0, 7)) == 0:
            who = draw(st.sampled_from(PODS))
            checked = [PodVerification(pod=who, version=version, level=VerificationLevel.RECEIVED)]
        status = WeightVersionStatus(
            phase=phase, sequence=i + 1 if numbered else None, verification=checked, message="m"
        )
        view = wv(version, created=T0 + timedelta(seconds=i), rv=str(i + 1), status=status)
        views.append(replace(view, name=f"{POOL}-{version}-{i}", uid=f"u{i}"))
    n_pods = draw(st.integers(0, 3))
    served = [draw(st.sampled_from([None, *names])) if names else None for _ in range(n_pods)]
    pods = [pod(PODS[k], f"127.0.0.{11 + k}", s) for k, s in enumerate(served)]
    current = draw(st.sampled_from([None, *names])) if names else None
    limit = draw(st.integers(0, 6))
    return fleet(pods, views, spec=pool_spec(len(pods), versionHistoryLimit=limit), current=current)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_planning_over_the_window_decides_what_planning_over_every_version_decides(full: Any) -> None:
    windowed = history.windowed(full, history.index(full.versions))
    assert len(windowed.versions) <= len(full.versions)
    a, b = plan(full), plan(windowed)
    assert a.actions == b.actions
    assert a.version_statuses == b.version_statuses
    assert a.pool_status == b.pool_status
    assert a.requeue_after == b.requeue_after


def test_a_long_finished_history_leaves_the_window_small() -> None:
    done = [
        replace(
            wv(
                f"v{i}",
                created=T0 + timedelta(seconds=i),
                rv=str(i),
                status=WeightVersionStatus(phase=Phase.SUPERSEDED, sequence=i),
            ),
            uid=f"u{i}",
        )
        for i in range(1, 1001)
    ]
    done[-1] = replace(done[-1], status=WeightVersionStatus(phase=Phase.COMPLETE, sequence=1000))
    f = fleet(
        [pod("llm-a", "127.0.0.11", "v1000")],
        done,
        spec=pool_spec(1, versionHistoryLimit=1000),
        current="v1000",
    )
    w = history.windowed(f, history.index(f.versions))
    assert [v.spec.version for v in w.versions] == ["v1000"]
    assert w.hidden_history == 999
    # one past the limit: the oldest is in the window, and pruned
    f = replace(f, spec=pool_spec(1, versionHistoryLimit=998))
    w = history.windowed(f, history.index(f.versions))
    assert [v.spec.version for v in w.versions] == ["v1", "v1000"]
    assert w.hidden_history == 998
    pruned = [a for a in plan(w).actions if type(a).__name__ == "PruneVersions"]
    assert [p.version for a in pruned for p in a.versions] == ["v1"]


def _obj(name: str, pool: str = POOL, phase: str = "Complete", rv: str = "1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "creationTimestamp": "2026-12-07T22:00:00Z",
        },
        "spec": {"poolRef": {"name": pool}, "version": name, "source": {"path": f"ckpts/{name}"}},
        "status": {"phase": phase, "sequence": int(name[1:])},
    }


def test_the_book_rebuilds_only_when_the_watch_replaced_an_object() -> None:
    book = history.VersionBook(POOL)
    objs = [_obj("v1"), _obj("v2"), _obj("x3", pool="other")]
    ix = book.update(objs)
    assert [v.name for v in ix.ordered] == ["v1", "v2"]
    assert set(book.objects) == {"v1", "v2"}
    assert book.update(list(objs)) is ix  # the same objects: nothing parsed, nothing sorted
    # an event replaced v2 (a new dict, as kopf's index stores one per event)
    objs[1] = _obj("v2", phase="Failed", rv="2")
    ix2 = book.update(objs)
    assert ix2 is not ix
    assert [v.status.phase for v in ix2.ordered] == [Phase.COMPLETE, Phase.FAILED]
    # deleted
    ix3 = book.update(objs[1:])
    assert [v.name for v in ix3.ordered] == ["v2"]
    assert set(book.objects) == {"v2"}
