#!/usr/bin/env bash
# What the demo's browser tests (tests/test_demo.py) need, on a fresh Debian machine: Debian's Chromium (Playwright's
# own browser download is not reachable from CI; the tests point Playwright at /usr/bin/chromium) and the `demo` and
# `demo-test` extras (Gradio, Playwright's Python package). Run from anywhere, after torch and the package are
# installed; installs nothing that is already there. Prints the versions it ends with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium >/dev/null
fi

"$PYTHON" -m pip install --quiet -e ".[demo,demo-test]"

echo "demo setup: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)," \
    "$("$PYTHON" -c 'import gradio; from importlib.metadata import version; print("gradio", gradio.__version__, "playwright", version("playwright"))')"
