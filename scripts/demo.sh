#!/usr/bin/env bash
# One command for a newcomer: set up what the demo needs (./.venv, CPU torch pinned), then train + index the digits
# demo and serve its dashboard. Arguments go to `gradstore demo` (--port 8010, --task lm, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
if [ -z "${VIRTUAL_ENV:-}" ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
exec gradstore demo "$@"
