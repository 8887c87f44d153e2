#!/usr/bin/env bash
# Installs the Debian 12 packages kvcache needs, only those that are missing.
set -euo pipefail
# Usage: scripts/install_deps.sh [--plots] [--extra PKG...]
#   --plots  also python3-numpy and python3-matplotlib (kvcache-eval --report plots; the
#            tool's end-to-end test checks the plots when they are installed)
# nlohmann-json3-dev is kvcache-eval's JSON library; python3 runs its end-to-end test.
packages=(cmake g++ make pkg-config libabsl-dev libtbb-dev catch2 libbenchmark-dev
          nlohmann-json3-dev python3 libhnswlib-dev)
while [ $# -gt 0 ]; do
  case "$1" in
    --plots) packages+=(python3-numpy python3-matplotlib); shift ;;
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
