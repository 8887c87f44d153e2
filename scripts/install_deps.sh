#!/usr/bin/env bash
# Installs the Debian 12 packages kvcache needs, only those that are missing.
# Usage: scripts/install_deps.sh [--bench] [--extra PKG...]
set -euo pipefail
packages=(cmake g++ make pkg-config libabsl-dev libtbb-dev catch2 libbenchmark-dev libhnswlib-dev)
while [ $# -gt 0 ]; do
  case "$1" in
    --extra) shift; while [ $# -gt 0 ]; do packages+=("$1"); shift; done ;;
    *) echo "install_deps.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}" >&2
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
