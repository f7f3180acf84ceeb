#!/usr/bin/env bash
# Exit 0 when every part of the local cluster is running (prints the kubeconfig path), else 1.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/scripts/env.sh"
source "$here/scripts/proc.sh"
rc=0
for p in etcd kube-apiserver kube-controller-manager kubelet; do
  if proc_alive "$p"; then echo "$p: running (pid $(cat "$(proc_pidfile "$p")"))" >&2; else echo "$p: stopped" >&2; rc=1; fi
done
[ $rc = 0 ] && echo "$KUBECONFIG_PATH"
exit $rc
