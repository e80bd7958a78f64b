#!/usr/bin/env bash
# One-time setup on a CPU machine: pins the CPU build of torch, then installs gradstore (editable) with its test tools.
# GPU machines: install your CUDA build of torch first (see README), then `pip install -e ".[dev,gpu]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
