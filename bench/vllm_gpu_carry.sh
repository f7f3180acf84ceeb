#!/usr/bin/env bash
# Prepares vLLM 0.26.0 (the release built for the GPU machines' torch 2.11 + CUDA 13) and the small
# wheels it imports for carrying to a device machine in two calls of at most 64 MiB each:
#   .carry/1/  first half of the stripped vLLM tarball + the wheels
#   .carry/2/  second half
# Each call names one folder in `carry` and runs bench/vllm_gpu_install.sh, which collects the parts
# under /tmp (kept while the machine stays warm) and installs once all are there. Re-runnable.
# What is left out of the wheel (a dense bf16 model on Hopper never loads it; platform notes):
# FlashAttention 2 (Hopper uses FA3), the MoE kernels, vllm-rs, deep_gemm for other Pythons, and
# the CUTLASS headers of deep_gemm / the Blackwell FMHA (JIT-only).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${HOTSWAP_CACHE:-$HOME/.cache/hotswap}/vllm-gpu-0.26.0"
mkdir -p "$work" .carry
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
pip=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
if [ ! -f "$work/vllm.tar.xz" ]; then
  "${pip[@]}" -d "$work/wheel" vllm==0.26.0
  rm -rf "$work/stage" && mkdir -p "$work/stage"
  (cd "$work/stage" && unzip -q ../wheel/vllm-0.26.0-*.whl)
  rm -f "$work"/stage/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$work"/stage/vllm/_moe_C_stable_libtorch.abi3.so \
    "$work"/stage/vllm/vllm-rs "$work"/stage/vllm/third_party/deep_gemm/_C.cpython-31[0134]*.so
  rm -rf "$work"/stage/vllm/third_party/fmha_sm100/cutlass/include "$work"/stage/vllm/third_party/deep_gemm/include
  (cd "$work/stage" && tar cf - vllm vllm-0.26.0.dist-info | xz -9 -T2 > ../vllm.tar.xz.tmp)
  mv "$work/vllm.tar.xz.tmp" "$work/vllm.tar.xz"
  rm -rf "$work/stage"
fi
if [ ! -f "$work/wheels/.complete" ]; then
  mkdir -p "$work/wheels"
  # vLLM's imports on the way to the OpenAI server that the device image lacks, plus the engine's own.
  "${pip[@]}" -d "$work/wheels" pyzmq msgspec cbor2 pybase64 cachetools "pydantic==2.14.4" "pydantic-core==2.50.5" \
    annotated-types typing-inspection typing-extensions "openai>=2.25,<3" anyio httpx httpcore h11 jiter idna \
    certifi distro sniffio openai-harmony partial-json-parser "llguidance<1.8,>=1.7" "xgrammar==0.2.8" \
    "apache-tvm-ffi==0.1.11" "fastapi<0.137,>=0.133" annotated-doc "starlette>=1.0.1" uvicorn watchfiles \
    "prometheus-fastapi-instrumentator>=8" "model-hosting-container-standards<1,>=0.1.14" jmespath msgpack blake3 \
    py-cpuinfo setproctitle ijson python-json-logger
  touch "$work/wheels/.complete"
fi
# The engine's own settings (pydantic-settings) came later: fetched into a warm cache too.
if [ ! -f "$work/wheels/.settings" ]; then
  "${pip[@]}" -d "$work/wheels" "pydantic-settings==2.16.3" python-dotenv
  touch "$work/wheels/.settings"
fi
rm -rf .carry/1 .carry/2 && mkdir -p .carry/1 .carry/2
half=$(( ($(stat -c %s "$work/vllm.tar.xz") + 1) / 2 ))
split -b "$half" -d -a 1 "$work/vllm.tar.xz" "$work/vllm.tar.xz.part"
mv "$work/vllm.tar.xz.part0" .carry/1/ && mv "$work/vllm.tar.xz.part1" .carry/2/
tar cf .carry/1/wheels.tar -C "$work/wheels" .
(cd .carry && sha256sum 1/vllm.tar.xz.part0 2/vllm.tar.xz.part1 | sed 's# [12]/# #' > SHA256SUMS)
cp .carry/SHA256SUMS .carry/1/ && cp .carry/SHA256SUMS .carry/2/
du -sh .carry/1 .carry/2
