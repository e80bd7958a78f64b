#!/usr/bin/env bash
# Lint, format check and type check (run by .ci/run before the tests).
# mypy needs the package laid out as `gradstore/<pkg>`; the repo maps those folders with setuptools package-dir,
# which mypy cannot follow through an editable install, so it checks a symlinked view of them.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
view="$(mktemp -d)"
trap 'rm -rf "$view"' EXIT
mkdir -p "$view/gradstore"
for package in logger projection store server evaluation demos; do ln -s "$PWD/$package" "$view/gradstore/$package"; done
(cd "$view" && mypy --config-file "$OLDPWD/pyproject.toml" -p gradstore)
