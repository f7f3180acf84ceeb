#!/usr/bin/env bash
# Debian packages the project needs at run time: Mooncake's non-CUDA build links libibverbs, libnuma
# and libcurl even when it only speaks TCP.
set -euo pipefail
need=()
for p in libibverbs1 libnuma1 libcurl4; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
