"""What `hotswap` prints: the pod table, the status summary, the live progress and the verdict."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hotswap_api.resources import InferencePool, SourceRef, Strategy, WeightVersion
from hotswap_cli import render
from hotswap_cli.commands import Io, follow, verdict, weight_version_body
from hotswap_cli.errors import CliError, ExitCode


def pod(name: str, version: str, ready: bool, ip: str = "", node: str = "node-1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"hotswap.dev/pool": "demo", "hotswap.dev/weight-version": version},
        },
        "spec": {"nodeName": node},
        "status": {
            "podIP": ip,
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"},
                {"type": "hotswap.dev/weights-ready", "status": "True" if ready else "False"},
            ],
        },
    }


def version(phase: str = "Updating", **status: Any) -> WeightVersion:
    return WeightVersion.model_validate(
        {
            "metadata": {"name": "demo-v2", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"poolRef": {"name": "demo"}, "version": "v2", "source": {"path": "ck/2"}},
            "status": {"phase": phase, **status},
        }
    )


POOL = InferencePool.model_validate(
    {
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "vllm"}]}},
            "model": {"path": "base"},
            "checkpointVolume": {"source": {"emptyDir": {}}},
        },
        "status": {
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "currentVersion": "v1",
            "targetVersion": "v2",
            "conditions": [
                {"type": "Available", "status": "True"},
                {"type": "Degraded", "status": "True", "reason": "AgentDown", "message": "pod b: no agent"},
            ],
        },
    }
)


def test_table_aligns_columns_and_marks_empty_cells() -> None:
    text = render.table(["A", "LONGER"], [["x", ""], ["wide-cell", "1"]])
    assert text.splitlines() == ["A          LONGER", "x          -", "wide-cell  1"]


def test_pods_table() -> None:
    rows = [render.pod_row(pod("demo-a", "v2", True, "10.0.0.5")), render.pod_row(pod("demo-b", "v1", False))]
    lines = render.pods_table(rows).splitlines()
    assert lines[0].split() == ["POD", "READY", "VERSION", "NODE", "IP"]
    assert lines[1].split() == ["demo-a", "True", "v2", "node-1", "10.0.0.5"]
    assert lines[2].split() == ["demo-b", "False", "v1", "node-1", "-"]


def test_status_text_summarises_pool_rollout_and_pods() -> None:
    text = render.status_text(
        POOL,
        [pod("demo-b", "v1", False), pod("demo-a", "v2", True, "10.0.0.5")],
        [version("Updating", replicas=2, updatedReplicas=1, message="updating 1 pod")],
    )
    assert "InferencePool ml/demo: desired 2, ready 1, updated 1" in text
    assert "current version: v1   target version: v2" in text
    assert "Available=True" in text and "Degraded (AgentDown): pod b: no agent" in text
    assert "latest rollout: demo v2: Updating, 1/2 pods" in text and "  updating 1 pod" in text
    pods = text.splitlines()[-2:]
    assert pods[0].startswith("demo-a") and pods[1].startswith("demo-b")  # sorted by name


def test_status_json_is_machine_readable() -> None:
    doc = render.status_json(POOL, [pod("demo-a", "v2", True, "10.0.0.5")], [])
    json.dumps(doc)  # serialisable
    assert doc["currentVersion"] == "v1" and doc["targetVersion"] == "v2" and doc["latestRollout"] is None
    assert doc["pods"] == [
        {
            "name": "demo-a",
            "ready": True,
            "weightsReady": True,
            "version": "v2",
            "node": "node-1",
            "ip": "10.0.0.5",
        }
    ]
    assert {c["type"] for c in doc["conditions"]} == {"Available", "Degraded"}


def test_status_of_a_fresh_pool_says_base() -> None:
    fresh = POOL.model_copy(update={"status": type(POOL.status)()})
    text = render.status_text(fresh, [], [])
    assert "current version: base   target version: base" in text and text.endswith("no pods")


def test_progress_line() -> None:
    line = render.progress_line(
        version(
            "Updating", replicas=3, updatedReplicas=1, failedReplicas=1, stageDurations={"staging": 2.04}
        ),
        75.0,
    )
    assert line.startswith("Updating   1/3 pods updated, 1 failed")
    assert "staging 2.0s, transfer -, reload -" in line and line.endswith("[1m15.0s]")


def test_outcome_line_has_total_and_stages() -> None:
    wv = version(
        "Complete",
        replicas=2,
        updatedReplicas=2,
        startTime="2026-01-01T00:00:00Z",
        completionTime="2026-01-01T00:00:12.5Z",
        stageDurations={"staging": 4.0, "transfer": 6.25, "reload": 0.5},
    )
    assert render.outcome_line("demo", wv) == (
        "demo v2: Complete in 12.5s, 2/2 pods (staging 4.0s, transfer 6.2s, reload 0.5s)"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def reader(states: list[WeightVersion]) -> Iterator[WeightVersion]:
    yield from states
    while True:
        yield states[-1]


def test_follow_prints_a_line_per_change_until_terminal() -> None:
    states = [
        version("Pending"),
        version("Pending"),
        version("Staging", replicas=2),
        version("Updating", replicas=2, updatedReplicas=1),
        version("Complete", replicas=2, updatedReplicas=2),
    ]
    it = reader(states)
    clock = Clock()
    err = io.StringIO()
    final = follow(lambda: next(it), 60.0, Io(out=io.StringIO(), err=err, clock=clock, sleep=clock.sleep))
    assert final.status.phase.value == "Complete"
    phases = [line.split()[0] for line in err.getvalue().splitlines()]
    assert phases == ["Pending", "Staging", "Updating", "Complete"]  # the repeated Pending is not reprinted
    assert clock.now == 4.0


def test_follow_redraws_in_place_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    it = reader([version("Staging"), version("Complete")])
    clock = Clock()
    err = Tty()
    follow(lambda: next(it), 60.0, Io(out=io.StringIO(), err=err, clock=clock, sleep=clock.sleep))
    text = err.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_follow_times_out_with_exit_4() -> None:
    it = reader([version("Staging", replicas=2)])
    clock = Clock()
    with pytest.raises(CliError) as err:
        follow(
            lambda: next(it), 5.0, Io(out=io.StringIO(), err=io.StringIO(), clock=clock, sleep=clock.sleep)
        )
    assert err.value.code is ExitCode.TIMEOUT
    assert "demo-v2 is still Staging" in err.value.message and "continues" in err.value.message
    assert clock.now == 5.0


@pytest.mark.parametrize(
    ("phase", "code", "needle"),
    [("Failed", ExitCode.FAILED, "demo-v2 failed: boom"), ("Superseded", ExitCode.FAILED, "superseded")],
)
def test_verdict_of_unsuccessful_rollouts(phase: str, code: ExitCode, needle: str) -> None:
    with pytest.raises(CliError) as err:
        verdict("demo", version(phase, message="boom"), Io(out=io.StringIO(), err=io.StringIO()))
    assert err.value.code is code and needle in err.value.message


def test_verdict_of_a_complete_rollout_prints_to_stdout() -> None:
    out = io.StringIO()
    assert (
        verdict("demo", version("Complete", replicas=1, updatedReplicas=1), Io(out=out, err=io.StringIO()))
        == 0
    )
    assert out.getvalue().startswith("demo v2: Complete")


def test_weight_version_body_satisfies_the_name_rule() -> None:
    body = weight_version_body(
        "demo", "ml", "v2", SourceRef(path="ck/2", sha256_manifest="ck/2/m.json"), Strategy.P2P, "90s"
    )
    assert body["metadata"]["name"] == "demo-v2"  # the CRD's rule: <poolRef.name>-<version>
    assert body["spec"] == {
        "poolRef": {"name": "demo"},
        "version": "v2",
        "source": {"path": "ck/2", "sha256Manifest": "ck/2/m.json"},
        "strategy": "P2P",
        "timeout": "90s",
    }
    WeightVersion.model_validate(body)
