#!/usr/bin/env bash
# One-time setup on a CPU machine: pins the CPU build of torch, then installs gradstore (editable) with its test tools.
# GPU machines: install your CUDA build of torch first (see README), then `pip install -e ".[dev,gpu]"`.
# The dashboard's browser test (tests/test_browser.py) drives the system Chromium through Playwright (no browser download):
# on Debian this installs the `chromium` package when it is missing (as root, or with passwordless sudo); where that is not
# possible it says so and the test is skipped (CI sets GRADSTORE_REQUIRE_BROWSER=1, which turns that skip into a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

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

install_chromium
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
