#!/usr/bin/env bash
# Device side of bench/vllm_gpu_carry.sh: keeps the parts this call carried under /tmp/hotswap-carry
# and installs into /tmp/site the wheels at once and vLLM 0.26 once both parts are there (idempotent).
# Usage (every call): bash bench/vllm_gpu_install.sh && export PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine:$PWD/testing
set -euo pipefail
dst=/tmp/hotswap-carry
mkdir -p "$dst"
for d in .carry/1 .carry/2; do
  [ -d "$d" ] && cp -n "$d"/* "$dst"/ 2>/dev/null || true
done
cd "$dst"
# The small wheels travel with the first part: installed at once, so that a call that carries only
# that part can already run the agent (bench/agent_gpu_check.py needs no vLLM).
if [ -f wheels.tar ] && [ ! -f /tmp/site/.wheels-complete ]; then
  mkdir -p /tmp/site wheels && tar xf wheels.tar -C wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl
  touch /tmp/site/.wheels-complete
  echo "vllm-install: wheels installed into /tmp/site"
fi
if [ -f /tmp/site/.vllm-complete ]; then echo "vllm-install: already installed"; exit 0; fi
if [ ! -f vllm.tar.xz.part0 ] || [ ! -f vllm.tar.xz.part1 ]; then
  echo "vllm-install: have $(ls "$dst" | tr '\n' ' '); waiting for the other part"; exit 0
fi
sha256sum -c SHA256SUMS
mkdir -p /tmp/site
cat vllm.tar.xz.part0 vllm.tar.xz.part1 | xz -d -T0 | tar xf - -C /tmp/site
touch /tmp/site/.vllm-complete
echo "vllm-install: installed into /tmp/site"
