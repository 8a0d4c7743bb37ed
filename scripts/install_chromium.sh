#!/usr/bin/env bash
# Debian's Chromium and its WebDriver (packages chromium, chromium-driver), which the /playground
# tests drive headless; installed with apt-get where missing (as root, or through sudo).
# Prints the path of chromedriver.
set -euo pipefail
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install Chromium and its chromedriver with the system's package manager (the tests look for them on PATH)" >&2
        exit 1
    fi
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi
command -v chromedriver
