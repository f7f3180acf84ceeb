#!/usr/bin/env bash
# Device side of bench/vllm_gpu_carry.sh: keeps the parts this call carried under /tmp/hotswap-carry
# and, once both are there, installs vLLM 0.26 and the wheels into /tmp/site (idempotent).
# Usage (every call): bash bench/vllm_gpu_install.sh && export PYTHONPATH=/tmp/site:$PWD/api:$PWD/engine:$PWD/testing
set -euo pipefail
dst=/tmp/hotswap-carry
mkdir -p "$dst"
for d in .carry/1 .carry/2; do
  [ -d "$d" ] && cp -n "$d"/* "$dst"/ 2>/dev/null || true
done
if [ -f /tmp/site/.vllm-complete ]; then echo "vllm-install: already installed"; exit 0; fi
cd "$dst"
if [ ! -f vllm.tar.xz.part0 ] || [ ! -f vllm.tar.xz.part1 ]; then
  echo "vllm-install: have $(ls "$dst" | tr '\n' ' '); waiting for the other part"; exit 0
fi
sha256sum -c SHA256SUMS
mkdir -p /tmp/site
cat vllm.tar.xz.part0 vllm.tar.xz.part1 | xz -d -T0 | tar xf - -C /tmp/site
mkdir -p wheels && tar xf wheels.tar -C wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl
touch /tmp/site/.vllm-complete
echo "vllm-install: installed into /tmp/site"
