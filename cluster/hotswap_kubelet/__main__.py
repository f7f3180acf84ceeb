"""Command line: python -m hotswap_kubelet --kubeconfig ... (cluster/scripts/up.sh starts it)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types

from .kubelet import PASS_ENV_DEFAULT, Kubelet, KubeletConfig


def parse(argv: list[str]) -> KubeletConfig:
    p = argparse.ArgumentParser(prog="hotswap_kubelet", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", default="hotswap-node")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--pod-ip-range", default="127.0.0.16-127.0.0.254")
    p.add_argument("--host-ip", default="127.0.0.1")
    p.add_argument("--apiserver-host", default="127.0.0.1")
    p.add_argument("--apiserver-port", type=int, required=True)
    p.add_argument("--cpu", default="32")
    p.add_argument("--memory", default="256Gi")
    p.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu the node advertises")
    p.add_argument("--mount-mode", choices=["auto", "namespace", "symlink"], default="auto")
    p.add_argument("--pass-env", default=PASS_ENV_DEFAULT, help="kubelet env vars every container inherits")
    p.add_argument("--backoff-max", type=float, default=20.0, help="cap of the crash-loop back-off (s)")
    a = p.parse_args(argv)
    return KubeletConfig(
        kubeconfig=a.kubeconfig,
        node_name=a.node_name,
        state_dir=a.state_dir,
        log_dir=a.log_dir,
        pod_ip_range=a.pod_ip_range,
        host_ip=a.host_ip,
        apiserver_host=a.apiserver_host,
        apiserver_port=a.apiserver_port,
        cpu=a.cpu,
        memory=a.memory,
        gpus=a.gpus,
        mount_mode=a.mount_mode,
        pass_env=a.pass_env,
        backoff_max=a.backoff_max,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    kubelet = Kubelet(parse(sys.argv[1:]))

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        kubelet.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    kubelet.run()


if __name__ == "__main__":
    main()
