#!/usr/bin/env bash
# One command for a newcomer: set up (CPU torch pinned), then train + index the digits demo and serve its dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec gradstore demo "$@"
