#!/usr/bin/env bash
# Set up Prism's virtual environment in .venv (idempotent). With --test, also the test tools; with --tensorrt,
# what building TensorRT engines needs (installed anyway wherever TensorRT imports, as in NVIDIA's container).
#
# The venv sees the system's packages, so inside NVIDIA's PyTorch container (DGX Spark) the container's
# own torch and TensorRT are used untouched; torch is installed only where none is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # Some containers lack ensurepip; a venv without its own pip still installs into itself through the
  # system's pip module (visible via --system-site-packages).
  "$PYTHON" -m venv --system-site-packages .venv 2>/dev/null || "$PYTHON" -m venv --system-site-packages --without-pip .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null
if ! $PY -c "import torch" 2>/dev/null; then
  # 2.13.0 is the release our CI machines carry as a local CPU wheel; elsewhere pip picks the platform's build.
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -r requirements.txt
if $PY -c "import tensorrt" 2>/dev/null || $PY -c "import tensorrt_rtx" 2>/dev/null; then
  # Where TensorRT is there (NVIDIA's container), what building engines needs comes too; nothing in it
  # pins torch or TensorRT, so the container's own stay as they are.
  $PY -m pip install -q -r requirements-tensorrt.txt
fi
for option in "$@"; do
  case "$option" in
    --tensorrt)  # the TensorRT build tools, also where TensorRT does not import yet
      $PY -m pip install -q -r requirements-tensorrt.txt ;;
    --test)
      $PY -m pip install -q -r requirements-test.txt
      if ! command -v chromium >/dev/null 2>&1; then
        # The browser tests drive Debian's chromium (Playwright's own browser download is not reachable here).
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null
      fi ;;
    *)
      echo "setup.sh: unknown option $option (use --test and/or --tensorrt)" >&2
      exit 2 ;;
  esac
done
