#!/usr/bin/env bash
# Starts the local cluster (etcd, kube-apiserver, kube-controller-manager, the hotswap kubelet) on
# 127.0.0.1, building the binaries first if this version is not cached. Idempotent: parts already
# running are left alone. The last line printed is `export KUBECONFIG=<path>`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/.." && pwd)"
source "$here/scripts/env.sh"
source "$here/scripts/proc.sh"
cd "$repo"  # pod processes start in the kubelet's folder: the repository root

bin="$(bash "$here/scripts/build.sh")"
pki="$CLUSTER_RUN/pki"
mkdir -p "$CLUSTER_RUN" "$CLUSTER_LOGS/pods" "$pki"
# One start or stop at a time (several test sessions may share the cluster).
exec 9>"$CLUSTER_RUN/.lock"
flock 9
t0=$(date +%s.%N)

# --- credentials (made once per run directory) ---------------------------------------------------
if [ ! -f "$pki/ca.crt" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=hotswap-local-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >"$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  # One RSA key signs ServiceAccount tokens (apiserver) and verifies them (apiserver, controller-manager).
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
fi
if [ ! -f "$pki/tokens.csv" ]; then
  admin_token="$(openssl rand -hex 24)"; kcm_token="$(openssl rand -hex 24)"
  # token,user,uid,"groups": the admin is in system:masters; the controller-manager uses the identity
  # the RBAC bootstrap policy grants (and per-controller ServiceAccounts on top).
  { echo "$admin_token,hotswap-admin,hotswap-admin,\"system:masters\""
    echo "$kcm_token,system:kube-controller-manager,system:kube-controller-manager"; } >"$pki/tokens.csv"
  chmod 600 "$pki/tokens.csv"
fi
write_kubeconfig() { # path token
  local ca; ca="$(base64 -w0 <"$pki/ca.crt")"
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: hotswap
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority-data: "$ca"}
users:
- name: user
  user: {token: "$2"}
contexts:
- name: hotswap
  context: {cluster: hotswap, user: user, namespace: default}
current-context: hotswap
KC
  chmod 600 "$1"
}
write_kubeconfig "$KUBECONFIG_PATH" "$(sed -n 1p "$pki/tokens.csv" | cut -d, -f1)"
write_kubeconfig "$CLUSTER_RUN/kcm.kubeconfig" "$(sed -n 2p "$pki/tokens.csv" | cut -d, -f1)"

# --- etcd ------------------------------------------------------------------------------------------
if ! proc_alive etcd; then
  # The cluster is ephemeral: a stopped cluster starts from an empty store (no stale pods from an
  # earlier session). HOTSWAP_CLUSTER_KEEP_DATA=1 keeps it.
  [ "${HOTSWAP_CLUSTER_KEEP_DATA:-0}" = 1 ] || rm -rf "$CLUSTER_RUN/etcd"
  # A fresh cluster gets fresh logs; the previous run's stay in logs/previous/.
  rm -rf "$CLUSTER_LOGS/previous" && mkdir -p "$CLUSTER_LOGS/previous"
  mv "$CLUSTER_LOGS"/*.log "$CLUSTER_LOGS/pods" "$CLUSTER_LOGS/previous/" 2>/dev/null || true
  mkdir -p "$CLUSTER_LOGS/pods"
  proc_start etcd "$bin/etcd" --name hotswap --data-dir "$CLUSTER_RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "hotswap=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn --quota-backend-bytes 2147483648
fi
wait_for "etcd health" 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

# --- kube-apiserver ---------------------------------------------------------------------------------
if ! proc_alive kube-apiserver; then
  proc_start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.key" --service-account-signing-key-file "$pki/sa.key" \
    --token-auth-file "$pki/tokens.csv" \
    --authorization-mode RBAC \
    --allow-privileged=true \
    --endpoint-reconciler-type none \
    --profiling=false --v=1
fi
wait_for "kube-apiserver /readyz" 120 curl -fsS --cacert "$pki/ca.crt" "https://127.0.0.1:$APISERVER_PORT/readyz"

# --- kube-controller-manager ------------------------------------------------------------------------
if ! proc_alive kube-controller-manager; then
  proc_start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$CLUSTER_RUN/kcm.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_RUN/kcm.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_RUN/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials=true \
    --leader-elect=false --controllers '*' \
    --profiling=false --v=1
fi

# --- the hotswap kubelet ----------------------------------------------------------------------------
venv_py="$repo/.venv/bin/python"
[ -x "$venv_py" ] || venv_py="$(command -v python3)"
if ! proc_alive kubelet; then
  # Pod processes inherit this PATH and PYTHONPATH: `python -m x` in a container runs the project venv.
  # testing/ (hotswap_testing: tiny models, plain launcher...) is there for test pods; images lack it.
  PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$repo/api:$repo/engine:$repo/operator:$repo/cluster:$repo/testing${PYTHONPATH:+:$PYTHONPATH}" \
  proc_start kubelet "$venv_py" -m hotswap_kubelet \
    --kubeconfig "$KUBECONFIG_PATH" --node-name "$NODE_NAME" \
    --state-dir "$CLUSTER_RUN/kubelet" --log-dir "$CLUSTER_LOGS" \
    --gpus "$NODE_GPUS" --cpu "$NODE_CPU" --memory "$NODE_MEMORY" \
    --pod-ip-range "$POD_IP_RANGE" --apiserver-host 127.0.0.1 --apiserver-port "$APISERVER_PORT"
fi

kc=(curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $(sed -n 1p "$pki/tokens.csv" | cut -d, -f1)")
api="https://127.0.0.1:$APISERVER_PORT"
# Ready means: the controller-manager made the default ServiceAccount (pods are admitted) and the
# node reports Ready.
wait_for "default ServiceAccount (kube-controller-manager)" 120 "${kc[@]}" "$api/api/v1/namespaces/default/serviceaccounts/default"
node_ready() {
  "${kc[@]}" "$api/api/v1/nodes/$NODE_NAME" | python3 -c 'import json,sys
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in json.load(sys.stdin)["status"]["conditions"]) else 1)'
}
wait_for "node $NODE_NAME Ready" 60 node_ready
echo "cluster-up: ready in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s; logs in $CLUSTER_LOGS" >&2
# eval "$(make cluster-up)" puts helm/kubectl on PATH and points kubectl at the cluster.
echo "export PATH=$bin:\$PATH"
echo "export KUBECONFIG=$KUBECONFIG_PATH"
