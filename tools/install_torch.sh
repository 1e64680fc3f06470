#!/usr/bin/env bash
# Install the pinned torch into the given Python without ever pulling a CUDA build onto a CPU machine.
# Order: an already-installed 2.13.0; a local wheel (pip's configured find-links, no index);
# PyTorch's CPU index when no NVIDIA driver is present; plain PyPI (CUDA build) on GPU machines.
set -euo pipefail
PY=${1:-python3}
VERSION=2.13.0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$VERSION' else 1)" 2>/dev/null; then
  exit 0
fi
# A local CPU wheel (pip's configured find-links): install that file; its few pure-Python
# dependencies come from the configured index.
LOCAL=$(mktemp -d)
trap 'rm -rf "$LOCAL"' EXIT
if "$PY" -m pip download --quiet --no-index --no-deps "torch==$VERSION" -d "$LOCAL" 2>/dev/null; then
  "$PY" -m pip install --quiet "$LOCAL"/torch-*.whl
  exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "No NVIDIA driver found: installing the CPU build of torch $VERSION from download.pytorch.org" >&2
  "$PY" -m pip install "torch==$VERSION" --index-url https://download.pytorch.org/whl/cpu
  exit 0
fi
"$PY" -m pip install "torch==$VERSION"
