#!/usr/bin/env bash
# Set up sd3fp8 in ./.venv (idempotent). Usage: scripts/setup.sh [--test]
# --test: the test dependencies too (pytest, the server extra, Playwright) and Debian's chromium.
#
# torch is installed here, not by pip's resolver: a bare `torch` requirement pulls a multi-GB CUDA
# build. Without a CUDA GPU we install the CPU build; with one, a torch already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SD3FP8_VENV:-.venv}
TORCH_VERSION=2.13.0

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() {  # pip, minus the warnings this machine's local index prints by the dozen
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither" "$log" || true
  rm -f "$log"
  return $rc
}

if ! "$PY" -W ignore -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found: installing torch with CUDA"
    pip_install "torch>=2.4"
  else
    echo "setup: no CUDA GPU: installing the CPU build of torch $TORCH_VERSION"
    # The local wheel index (where present) has the +cpu build; else PyTorch's CPU index does.
    pip_install "torch==$TORCH_VERSION+cpu" || pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -W ignore -c "import torch" 2>/dev/null || { echo "setup: torch failed to install" >&2; exit 1; }

extras="[server]"  # `sd3fp8 serve`: ComfyUI's API and web UI
[ "${1:-}" = "--test" ] && extras="[test]"  # test pulls the server extra too, and Playwright
pip_install -e ".$extras"

# The browser test drives Debian's chromium through Playwright (Playwright's own browser download is
# not used). Installed when missing and we are root with apt-get; otherwise that one test skips.
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no /usr/bin/chromium (as root: apt-get install chromium): the browser test will skip"
  fi
fi
"$PY" -c "import sd3fp8, torch; print(f'setup: sd3fp8 {sd3fp8.__version__} ready (torch {torch.__version__}) in $VENV')"
