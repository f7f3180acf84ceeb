"""Acceptance: Deployments, probes, readiness gates, restarts and volumes on the local cluster
(real kube-apiserver + kube-controller-manager, pods run by the hotswap kubelet)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hotswap_cluster.processes import pod_processes
from hotswap_cluster.waiting import Waiter, wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster
APPS = Path(__file__).resolve().parent / "podapps"
GATE = "hotswap.dev/weights-ready"


def downward_env() -> list[client.V1EnvVar]:
    def field(name: str, path: str) -> client.V1EnvVar:
        return client.V1EnvVar(
            name=name,
            value_from=client.V1EnvVarSource(field_ref=client.V1ObjectFieldSelector(field_path=path)),
        )

    return [
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_IP", "status.podIP"),
        field("NODE", "spec.nodeName"),
    ]


def echo_container(
    readiness_path: str = "/healthz", liveness: client.V1Probe | None = None
) -> client.V1Container:
    return client.V1Container(
        name="web",
        image="ignored.local/echo:1",
        command=[sys.executable, str(APPS / "echo_server.py"), "8080"],
        env=downward_env(),
        ports=[client.V1ContainerPort(name="http", container_port=8080)],
        readiness_probe=client.V1Probe(
            http_get=client.V1HTTPGetAction(path=readiness_path, port="http"),
            period_seconds=1,
            failure_threshold=1,
        ),
        liveness_probe=liveness,
    )


def http_get(ip: str, port: int = 8080, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def try_get(ip: str) -> str | None:
    """The body of GET / on the pod, or None while nothing listens yet."""
    try:
        return http_get(ip)
    except OSError:
        return None


def deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[echo_container()], termination_grace_period_seconds=5),
            ),
        ),
    )


def pod_answers(pods: list[Any]) -> None:
    """Each pod serves on its own loopback IP and answers with its own name."""
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == len(ips), ips
    for p in pods:
        assert p.status.pod_ip.startswith("127."), p.status.pod_ip
        assert p.status.host_ip == "127.0.0.1"
        assert http_get(p.status.pod_ip) == p.metadata.name
        assert pod_processes(uid=p.metadata.uid), f"no process for pod {p.metadata.name}"


def test_deployment_scales_and_namespace_deletion_leaves_no_process(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter
) -> None:
    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(namespace, deployment("web", 2))
    waiter.deployment_available("web", 2)

    rs_list = apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
    assert len(rs_list) == 1 and rs_list[0].metadata.owner_references[0].kind == "Deployment"
    pods = waiter.ready_pods("app=web", 2)
    for p in pods:
        assert p.metadata.owner_references[0].name == rs_list[0].metadata.name
        assert p.spec.node_name == "hotswap-node"
        names = {c.type: c.status for c in p.status.conditions}
        assert names == {
            "PodScheduled": "True",
            "Initialized": "True",
            "ContainersReady": "True",
            "Ready": "True",
        }
        assert p.status.container_statuses[0].state.running is not None
    pod_answers(pods)

    apps.patch_namespaced_deployment_scale(namespace=namespace, name="web", body={"spec": {"replicas": 3}})
    waiter.deployment_available("web", 3)
    three = waiter.ready_pods("app=web", 3)
    pod_answers(three)
    assert {p.metadata.uid for p in pods} <= {p.metadata.uid for p in three}

    apps.patch_namespaced_deployment_scale(namespace=namespace, name="web", body={"spec": {"replicas": 1}})
    waiter.deployment_available("web", 1)
    (last,) = waiter.ready_pods("app=web", 1)
    pod_answers([last])
    for p in three:
        if p.metadata.uid != last.metadata.uid:
            wait_for(
                lambda p=p: not pod_processes(uid=p.metadata.uid), 30, f"processes of {p.metadata.name} gone"
            )
            with pytest.raises(OSError):
                http_get(p.status.pod_ip)

    assert pod_processes(namespace=namespace)
    core.delete_namespace(namespace)

    def ns_gone() -> bool:
        try:
            core.read_namespace(namespace)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(ns_gone, 120, f"namespace {namespace} deleted")
    assert pod_processes(namespace=namespace) == {}
    with pytest.raises(OSError):
        http_get(last.status.pod_ip)


def test_failing_readiness_probe_keeps_pod_not_ready(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter
) -> None:
    core = client.CoreV1Api(kube_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="never-ready"),
        spec=client.V1PodSpec(containers=[echo_container(readiness_path="/not-there")]),
    )
    core.create_namespaced_pod(namespace, pod)
    p = waiter.until(
        lambda: (x := waiter.pod("never-ready")).status.pod_ip and x.status.phase == "Running" and x,
        "pod never-ready running",
    )
    # The server answers (so the process is up) while the probe's path returns 404.
    wait_for(lambda: try_get(p.status.pod_ip) == "never-ready", 20, "server answering")

    # The kubelet reports the probe's 404 (once it failed failureThreshold = 3 times in a row, one
    # per period of 1 s) with an Unhealthy event; the status it wrote since still says not ready.
    def unhealthy() -> list[Any]:
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=never-ready,reason=Unhealthy"
        ).items
        return [
            e for e in events if e.message == "Readiness probe failed: HTTP probe failed with statuscode: 404"
        ]

    waiter.until(unhealthy, "an Unhealthy event for the readiness probe's 404", timeout=30)
    p = waiter.pod("never-ready")
    conds = {c.type: c for c in p.status.conditions}
    assert conds["Ready"].status == "False" and conds["ContainersReady"].status == "False"
    assert conds["Ready"].reason == "ContainersNotReady"
    cs = p.status.container_statuses[0]
    assert cs.ready is False and cs.state.running is not None and cs.restart_count == 0


def test_readiness_gate_condition_flips_ready(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter
) -> None:
    core = client.CoreV1Api(kube_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="gated"),
        spec=client.V1PodSpec(
            containers=[echo_container()], readiness_gates=[client.V1PodReadinessGate(condition_type=GATE)]
        ),
    )
    core.create_namespaced_pod(namespace, pod)

    def conds() -> dict[str, Any]:
        return {c.type: c for c in waiter.pod("gated").status.conditions or []}

    c = waiter.until(
        lambda: (x := conds()).get("ContainersReady") and x["ContainersReady"].status == "True" and x,
        "containers ready",
    )
    assert c["Ready"].status == "False" and c["Ready"].reason == "ReadinessGatesNotReady", c["Ready"]

    def set_gate(status: str) -> None:
        core.patch_namespaced_pod_status(
            "gated",
            namespace,
            {"status": {"conditions": [{"type": GATE, "status": status, "reason": "Test"}]}},
        )

    set_gate("True")
    waiter.until(lambda: conds()["Ready"].status == "True", "Ready after the gate is True")
    # The kubelet writes its status again (after anything it owns changes, or, as here, after someone
    # overwrote one of its conditions): its writes must keep the gate condition, which it does not own.
    core.patch_namespaced_pod_status(
        "gated",
        namespace,
        {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Test"}]}},
    )
    waiter.until(lambda: conds()["Ready"].status == "True", "the kubelet writing Ready again")
    c = conds()
    assert c[GATE].status == "True" and c["Ready"].status == "True"
    set_gate("False")
    waiter.until(lambda: conds()["Ready"].status == "False", "not Ready after the gate is False")
    assert conds()["ContainersReady"].status == "True"


def test_crashing_container_restarts_and_liveness_failure_restarts(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter
) -> None:
    core = client.CoreV1Api(kube_api)
    crash = client.V1Container(
        name="crash", image="x", command=[sys.executable, "-c", "import sys; sys.exit(3)"]
    )
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(metadata=client.V1ObjectMeta(name="crash"), spec=client.V1PodSpec(containers=[crash])),
    )
    live = echo_container(
        liveness=client.V1Probe(
            _exec=client.V1ExecAction(command=["sh", "-c", "test -f /nonexistent"]),
            period_seconds=1,
            failure_threshold=1,
        )
    )
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="unhealthy"),
            spec=client.V1PodSpec(containers=[live], termination_grace_period_seconds=2),
        ),
    )
    cs = waiter.until(
        lambda: (s := waiter.pod("crash").status.container_statuses) and s[0].restart_count >= 2 and s[0],
        "crash restarted twice",
    )
    assert cs.last_state.terminated.exit_code == 3
    assert waiter.pod("crash").status.phase == "Running"
    waiter.until(
        lambda: (s := waiter.pod("unhealthy").status.container_statuses) and s[0].restart_count >= 1,
        "liveness restart",
    )

    reasons = {(e.involved_object.name, e.reason) for e in core.list_namespaced_event(namespace).items}
    assert {
        ("crash", "BackOff"),
        ("unhealthy", "Unhealthy"),
        ("crash", "Scheduled"),
        ("crash", "Started"),
    } <= reasons

    never = client.V1Container(
        name="once", image="x", command=[sys.executable, "-c", "import sys; sys.exit(0)"]
    )
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="once"),
            spec=client.V1PodSpec(containers=[never], restart_policy="Never"),
        ),
    )
    p = waiter.until(
        lambda: (x := waiter.pod("once")).status.phase == "Succeeded" and x, "pod once Succeeded"
    )
    assert p.status.container_statuses[0].restart_count == 0
    assert p.status.container_statuses[0].state.terminated.reason == "Completed"


def test_volumes_env_and_in_cluster_credentials(
    kube_api: client.ApiClient, namespace: str, waiter: Waiter, tmp_path: Path
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="s"), string_data={"password": "hunter2"}),
    )
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"mode": "fast"})
    )
    tmp_path.chmod(0o777)
    env = [
        *downward_env(),
        client.V1EnvVar(
            name="FROM_SECRET",
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name="s", key="password")
            ),
        ),
        client.V1EnvVar(
            name="FROM_CM",
            value_from=client.V1EnvVarSource(
                config_map_key_ref=client.V1ConfigMapKeySelector(name="c", key="mode")
            ),
        ),
        client.V1EnvVar(name="EXPANDED", value="$(POD_NAME)-$(FROM_CM)"),
    ]
    shared = client.V1VolumeMount(name="shared", mount_path="/tmp/hotswap-test/shared")
    writer = client.V1Container(
        name="writer",
        image="x",
        command=[
            "sh",
            "-c",
            "cd /tmp/hotswap-test/shared && "
            'echo "written by $POD_NAME" > from-writer.tmp && mv from-writer.tmp from-writer && '
            "exec sleep 3600",
        ],
        env=env,
        volume_mounts=[shared],
    )
    reader = client.V1Container(
        name="reader",
        image="x",
        command=[sys.executable, str(APPS / "volume_check.py"), "/tmp/hotswap-test/results"],
        env=env,
        volume_mounts=[
            shared,
            client.V1VolumeMount(name="secret", mount_path="/tmp/hotswap-test/secret", read_only=True),
            client.V1VolumeMount(name="results", mount_path="/tmp/hotswap-test/results"),
        ],
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="volumes"),
        spec=client.V1PodSpec(
            containers=[writer, reader],
            termination_grace_period_seconds=1,
            volumes=[
                client.V1Volume(name="shared", empty_dir=client.V1EmptyDirVolumeSource()),
                client.V1Volume(name="secret", secret=client.V1SecretVolumeSource(secret_name="s")),
                client.V1Volume(
                    name="results",
                    host_path=client.V1HostPathVolumeSource(path=str(tmp_path), type="Directory"),
                ),
            ],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    report_path = tmp_path / "report.json"
    wait_for(
        report_path.exists,
        60,
        "the reader container's report",
        lambda: waiter.explain(lambda: waiter.pod("volumes"))(),
    )
    report = json.loads(report_path.read_text())
    p = waiter.pod("volumes")
    assert report["shared"] == "written by volumes\n"
    assert report["secret_file"] == "hunter2"
    assert report["secret_writable"] is False, report
    assert report["env"] == {
        "POD_NAME": "volumes",
        "POD_NAMESPACE": namespace,
        "POD_IP": p.status.pod_ip,
        "NODE": "hotswap-node",
        "FROM_SECRET": "hunter2",
        "FROM_CM": "fast",
        "EXPANDED": "volumes-fast",
    }
    # The ServiceAccount token projected by the kubelet authenticates as the pod's ServiceAccount,
    # which holds no permissions: 403 from the real RBAC authorizer.
    assert report["in_cluster_status"] == 403, report
    assert f"system:serviceaccount:{namespace}:default" in report["in_cluster_body"]
    assert report["sa_namespace"] == namespace
    # Mounts are private to the pod's processes: nothing appears on the host at the mountPath.
    assert not Path("/tmp/hotswap-test/shared/from-writer").exists()
