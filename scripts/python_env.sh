#!/usr/bin/env bash
# Prints the path of the Python virtual environment for python/requirements.txt, creating it when
# missing. It lives outside the clone (CI runs in a fresh clone; torch with its CUDA wheels is
# several GB), keyed by the requirements file's hash so a changed pin builds a new one:
#   ~/.cache/kvcache/venv-<first 12 hex of sha256(python/requirements.txt)>
# Uses Debian's /usr/bin/python3 (3.11); installs python3-venv / python3-dev when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
req=python/requirements.txt
hash=$(sha256sum "$req" | cut -c1-12)
root=${KVCACHE_VENV_ROOT:-$HOME/.cache/kvcache}
venv=$root/venv-$hash
if [ ! -f "$venv/.complete" ]; then
  # Debian's python3 without python3-venv has no ensurepip; python3-dev has Python.h for the
  # extension build. install_deps.sh installs only what is missing (sudo when not root).
  scripts/install_deps.sh --extra python3-venv python3-dev >&2
  echo "python_env: creating $venv (torch + CUDA wheels: a few minutes, ~6 GB)" >&2
  start=$(date +%s)
  rm -rf "$venv"
  mkdir -p "$root"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$req" >&2
  touch "$venv/.complete"
  echo "python_env: created in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)" >&2
fi
echo "$venv"
