#!/usr/bin/env bash
# One GPU session's work, run on a one-GPU device machine from the repository root, usually in the
# background (setsid: it outlives the call that starts it, so later calls can collect its results):
#   STEPS="ckpt-8b agent-new agent-old verify-cost" setsid nohup bash bench/gpu_session.sh /tmp/gpu-results \
#     > /tmp/gpu-results.log 2>&1 &
# Every step writes JSON + logs under the results folder and a line to its STATUS file. Steps run in
# the order given, one at a time unless said otherwise (their timings are reported):
#   phase-a      the diagnosis matrix and the small-model check side by side (no timing claims)
#   ckpt-8b      the two Qwen3-8B-shaped checkpoints (v0, v1) under /tmp/vllm-check/qwen3-8b (no vLLM)
#   check-8b     the product path through real vLLM on them (needs vLLM: bench/vllm_gpu_install.sh)
#   agent-new    the agent + plain receiver on them (bench/agent_gpu_check.py of this tree)
#   agent-old    the same with the tree at $OLD (default .carry/old: `git archive` of the commit before
#                the architecture pass, cf9fc36), its own script, on the same checkpoints
#   verify-cost  bench/verification_cost.py tensors on the GPU, 8 GiB of checkpoint-like tensors
set -uo pipefail
res="${1:-/tmp/gpu-results}"
steps="${STEPS:-phase-a check-8b agent-new}"
old="${OLD:-$PWD/.carry/old}"
ckpts=/tmp/vllm-check/qwen3-8b
mkdir -p "$res"
export PYTHONPATH="/tmp/site:$PWD/api:$PWD/engine:$PWD/testing:$PWD/bench" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# many engines compile at once in phase A: a few Inductor workers each, not one per core each
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
step() {
  local name=$1; shift
  echo "$(date +%T) start $name" >> "$res/STATUS"
  local t0=$SECONDS
  "$@" > "$res/$name.log" 2>&1
  echo "$(date +%T) end $name rc=$? $((SECONDS - t0))s" >> "$res/STATUS"
}
agent_check() {  # tree, out: 5 updates cycling v1, v0... on one GPU, world size 1
  (cd "$1" && PYTHONPATH="/tmp/site:$1/api:$1/engine:$1/testing:$1/bench" python3 bench/agent_gpu_check.py \
    --device cuda --gpus 1 --shape qwen3-8b --updates 5 --versions 2 --checkpoints "$ckpts" --out "$2")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$res/gpu.txt" 2>&1
for s in $steps; do
  case $s in
    phase-a)
      step diag python3 bench/vllm_gpu_diag.py --out "$res/diag" --configs "${DIAG_CONFIGS:-default,no-aot,eager}" &
      step check-small python3 bench/vllm_gpu_check.py --shape small --util 0.08 --kv-gib 1 --out "$res/check" &
      wait ;;
    ckpt-8b)
      step ckpt-8b python3 -c "
from pathlib import Path; from vllm_gpu_diag import SHAPES, write_model
root = Path('$ckpts'); v0 = write_model(root / 'v0', SHAPES['qwen3-8b'], 0); write_model(root / 'v1', SHAPES['qwen3-8b'], 1, base=v0)" ;;
    check-8b)
      step check-8b python3 bench/vllm_gpu_check.py --shape qwen3-8b --updates 3 --checkpoints 2 --no-broken \
        --util 0.3 --kv-gib 4 --out "$res/check" ;;
    agent-new) step agent-new agent_check "$PWD" "$res/agent-new" ;;
    agent-old) step agent-old agent_check "$old" "$res/agent-old" ;;
    verify-cost)
      step verify-cost python3 bench/verification_cost.py tensors --device cuda --mib 8192 --label tensors-cuda
      cp bench/results/verification_cost-tensors-cuda.json "$res/" 2>/dev/null ;;
    *) echo "$(date +%T) unknown step $s" >> "$res/STATUS" ;;
  esac
done
echo "$(date +%T) all done" >> "$res/STATUS"
