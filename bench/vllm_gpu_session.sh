#!/usr/bin/env bash
# One GPU session's work for issue #16, started in the background on the device machine
# (setsid: it outlives the call that starts it) so that later calls can collect its results:
#   setsid nohup bash bench/vllm_gpu_session.sh /tmp/gpu-results > /tmp/gpu-results.log 2>&1 &
# Every step writes JSON + logs under the results folder and a line to its STATUS file.
set -uo pipefail
res="${1:-/tmp/gpu-results}"
mkdir -p "$res"
export PYTHONPATH="/tmp/site:$PWD/api:$PWD/engine:$PWD/testing:$PWD/bench" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# many engines compile at once in phase A: a few Inductor workers each, not one per core each
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
step() {
  local name=$1; shift
  echo "$(date +%T) start $name" >> "$res/STATUS"
  local t0=$SECONDS
  "$@" > "$res/$name.log" 2>&1
  echo "$(date +%T) end $name rc=$? ${SECONDS}s-$t0" >> "$res/STATUS"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$res/gpu.txt" 2>&1
# Phase A, side by side (small model: GPU memory and 16 cores suffice; no timing claims here):
# the diagnosis matrix and the full check through agent + launcher.
if [ -z "${SKIP_A:-}" ]; then
  step diag python3 bench/vllm_gpu_diag.py --out "$res/diag" --configs "${DIAG_CONFIGS:-default,no-aot,eager}" &
  step check-small python3 bench/vllm_gpu_check.py --shape small --util 0.08 --kv-gib 1 --out "$res/check" &
  wait
fi
# Phase B, alone on the machine (its update times are reported): the Qwen3-8B shape through real
# vLLM, then the same checkpoints through the plain receiver.
if [ -z "${SKIP_B:-}" ]; then
  step check-8b python3 bench/vllm_gpu_check.py --shape qwen3-8b --updates 3 --checkpoints 2 --no-broken --util 0.3 --kv-gib 4 --out "$res/check"
  step plain-8b python3 bench/agent_gpu_check.py --device cuda --gpus 1 --shape qwen3-8b --updates 4 --versions 2 --checkpoints /tmp/vllm-check/qwen3-8b --out "$res/plain"
fi
echo "$(date +%T) all done" >> "$res/STATUS"
