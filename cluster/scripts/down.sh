#!/usr/bin/env bash
# Stops the local cluster and every pod process it started. Idempotent. The etcd data goes with it
# (the cluster is ephemeral); credentials stay so kubeconfigs written earlier stay valid.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/scripts/env.sh"
source "$here/scripts/proc.sh"
mkdir -p "$CLUSTER_RUN"
exec 9>"$CLUSTER_RUN/.lock"
flock 9

# The kubelet stops its pods' processes on SIGTERM (each pod gets at most a few seconds).
proc_stop kubelet 30
# Backstop: every pod process carries HOTSWAP_KUBELET_STATE=<state dir> in its environment (set by
# the kubelet), which also marks the children they spawn; kill any that survived.
marker="HOTSWAP_KUBELET_STATE=$CLUSTER_RUN/kubelet"
for env in /proc/[0-9]*/environ; do
  pid="${env#/proc/}"; pid="${pid%/environ}"
  if { tr "\0" "\n" <"$env"; } 2>/dev/null | grep -qxF -- "$marker"; then
    kill -KILL "$pid" 2>/dev/null && echo "cluster-down: killed leftover pod process $pid" >&2 || true
  fi
done
proc_stop kube-controller-manager 10
proc_stop kube-apiserver 15
proc_stop etcd 10
[ "${HOTSWAP_CLUSTER_KEEP_DATA:-0}" = 1 ] || rm -rf "$CLUSTER_RUN/etcd" "$CLUSTER_RUN/kubelet"
rm -rf "$CLUSTER_RUN/test-sessions" "$CLUSTER_RUN/started-by-tests"
echo "cluster-down: stopped" >&2
