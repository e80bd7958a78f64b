#!/usr/bin/env bash
# One-time setup, CPU or GPU, Python >= 3.10 (constraints.txt was resolved on 3.11):
#   bash scripts/setup.sh && . .venv/bin/activate          gradstore and its test tools (what the tests and CI need)
#   bash scripts/setup.sh --demo                           gradstore alone: what `gradstore demo` needs (scripts/demo.sh)
# Installs into the active virtualenv, or creates ./.venv (python3 -m venv .venv) when none is active. Then, with
# a line per phase: upgrades pip (the pip a new venv ships backtracks for half an hour over this dependency set),
# installs torch==2.13.0 (the CPU build) unless the environment already has a torch (GPU users install their CUDA
# build first, see README), then gradstore (editable), with its test tools unless --demo, pinned by constraints.txt.
# Set PYTHON to choose the interpreter for a new .venv (default: python3).
# The dashboard's browser test (tests/test_browser.py) drives the system Chromium through Playwright (no browser download):
# on Debian this installs the `chromium` package when it is missing (as root, or with passwordless sudo); where that is not
# possible it says so and the test is skipped (CI sets GRADSTORE_REQUIRE_BROWSER=1, which turns that skip into a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[dev]"
case "${1:-}" in
    --demo) extras="" ;;
    "") ;;
    *) echo "usage: bash scripts/setup.sh [--demo]" >&2; exit 2 ;;
esac

install_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
    fi
    if ! command -v apt-get >/dev/null 2>&1 || [ "$sudo" = none ]; then
        echo "setup: no chromium and no (root) apt-get to install it; tests/test_browser.py will be skipped" >&2
        return 0
    fi
    echo "setup: installing the Debian chromium package (headless browser for tests/test_browser.py)"
    local log
    log="$(mktemp)"
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
           && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "setup: could not install chromium (see above); tests/test_browser.py will be skipped" >&2
    fi
    rm -f "$log"
}

started=$SECONDS
phase() { printf '\nsetup [%3ds] %s\n' "$((SECONDS - started))" "$*"; }

venv_here=""
if [ -n "${VIRTUAL_ENV:-}" ]; then
    phase "using the active virtualenv $VIRTUAL_ENV"
else
    venv_here=1
    if [ ! -x .venv/bin/python ]; then
        phase "creating the virtualenv .venv (${PYTHON:-python3} -m venv .venv)"
        "${PYTHON:-python3}" -m venv .venv
    else
        phase "using the virtualenv .venv"
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup: gradstore needs Python >= 3.10 (set PYTHON=python3.11)" >&2; exit 1; }
pins=(-c constraints.txt)
if ! python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup: constraints.txt was resolved on Python 3.11; installing without it (pip may take longer to resolve)" >&2
    pins=()
fi

if [ -n "$extras" ]; then
    phase "chromium for the browser test"
    install_chromium
fi

pip=(python -m pip install --disable-pip-version-check "${pins[@]}")
phase "upgrading pip (a current resolver: the pip a new venv ships backtracks for minutes over this set)"
"${pip[@]}" --upgrade pip

if python -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
    phase "keeping the installed torch $(python -c 'import importlib.metadata as m; print(m.version("torch"))')"
else
    phase "installing torch==2.13.0 (the CPU build; GPU: install your CUDA build first, see README)"
    "${pip[@]}" "torch==2.13.0"
fi

phase "installing gradstore (editable)${extras:+ with its test tools}: pip install ${pins[*]} -e '.$extras'"
"${pip[@]}" -e ".$extras"

phase "done: gradstore $(python -c 'import importlib.metadata as m; print(m.version("gradstore"))') in $(python -c 'import sys; print(sys.prefix)')"
if [ -n "$venv_here" ]; then
    echo "activate it in your shell with:  . .venv/bin/activate"
fi
