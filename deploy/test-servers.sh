#!/usr/bin/env bash
# Install the real servers that the test-suite starts (see tests/servers.py).
#
#   deploy/test-servers.sh install
#
# What the tests run in place of the production servers:
#   VictoriaMetrics (apt)  for InfluxDB      - accepts influxdb-client writes unchanged
#   mongoeco (PyPI)        for MongoDB       - wire-protocol server on SQLite, needs Python >= 3.13,
#                                              so it lives in its own venv: .cache/mongoeco-venv
#   Mosquitto (apt)        the MQTT broker users run
#   MicroPython (npm)      WebAssembly build run by node, for the firmware's pure logic: .cache/node
#   Chromium + chromedriver (apt)  a real browser for the dashboard test (driven by selenium)
#   wrk (apt)              HTTP load for benchmarks/web.py
#   nats-server (apt)      NATS with JetStream, for the jetstream journal and the cluster test (its
#                          client nats-py comes with the `test` extra, `make test` installs it)
#
# Idempotent: each component is checked first and only installed when missing.
# Prints one line per component; exits non-zero naming the component that could not be installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
MONGOECO_VENV="$CACHE/mongoeco-venv"
MONGOECO_REQUIREMENT='mongoeco[wire]>=4.11,<5'
PYTHON313_FALLBACK=/root/.pyenv/versions/3.13.0/bin/python3.13
NODE_PREFIX="$CACHE/node"
MPY_PACKAGE='@micropython/micropython-webassembly-pyscript'
MPY_VERSION='1.27.0'
APT_PACKAGES=(victoria-metrics mosquitto mosquitto-clients chromium chromium-driver wrk nats-server)
APT_BINARIES=(victoria-metrics mosquitto mosquitto_pub mosquitto_sub chromium chromedriver wrk nats-server)
LOG_DIR="$CACHE/install-logs"

say() { printf '%-12s %s\n' "$1:" "$2"; }
die() { printf 'test-servers: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

# apt-get install, running apt-get update only when the first attempt fails (stale or empty lists).
apt_install() {
    local log="$LOG_DIR/apt.log"
    export DEBIAN_FRONTEND=noninteractive
    if as_root apt-get install -y -q "$@" >"$log" 2>&1; then return 0; fi
    as_root apt-get update -q >>"$log" 2>&1 || true
    as_root apt-get install -y -q "$@" >>"$log" 2>&1 || {
        tail -n 20 "$log" >&2
        die "apt-get install $* failed (full log: $log)"
    }
}

missing_binaries() {
    local name
    for name in "$@"; do command -v "$name" >/dev/null || printf '%s ' "$name"; done
}

install_apt_servers() {
    local missing start
    missing="$(missing_binaries "${APT_BINARIES[@]}")"
    if [ -z "$missing" ]; then
        say apt "${APT_PACKAGES[*]} already installed"
        return
    fi
    start=$SECONDS
    apt_install "${APT_PACKAGES[@]}"
    missing="$(missing_binaries "${APT_BINARIES[@]}")"
    [ -z "$missing" ] || die "apt installed ${APT_PACKAGES[*]} but these are still not on PATH: $missing"
    say apt "installed ${APT_PACKAGES[*]} ($((SECONDS - start)) s)"
}

# A python3.13 that really runs: a pyenv shim may exist and still fail with
# "pyenv: python3.13: command not found" when 3.13 is not the selected version.
find_python313() {
    local candidate
    for candidate in "$(command -v python3.13 || true)" "$PYTHON313_FALLBACK"; do
        [ -n "$candidate" ] || continue
        if PYENV_VERSION=3.13.0 "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# Prints the installed mongoeco version when its wire server and SQLite engine import.
mongoeco_version() {
    "$MONGOECO_VENV/bin/python" -c '
import mongoeco.engines.sqlite, mongoeco.wire.proxy
from importlib.metadata import version
print(version("mongoeco"))' 2>/dev/null
}

install_mongoeco() {
    local python start version
    if version="$(mongoeco_version)"; then
        say mongoeco "mongoeco $version already installed in ${MONGOECO_VENV#"$ROOT"/}"
        return
    fi
    start=$SECONDS
    python="$(find_python313)" || die "mongoeco needs Python >= 3.13: none found (tried python3.13 on PATH and $PYTHON313_FALLBACK)"
    # --clear: a venv left half-made by an interrupted run is rebuilt, not patched.
    PYENV_VERSION=3.13.0 "$python" -m venv --clear "$MONGOECO_VENV" >"$LOG_DIR/mongoeco.log" 2>&1 \
        || die "could not create $MONGOECO_VENV with $python (log: $LOG_DIR/mongoeco.log)"
    "$MONGOECO_VENV/bin/python" -m pip install -q "$MONGOECO_REQUIREMENT" >>"$LOG_DIR/mongoeco.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/mongoeco.log" >&2
        die "pip install '$MONGOECO_REQUIREMENT' failed (log: $LOG_DIR/mongoeco.log)"
    }
    version="$(mongoeco_version)" || die "mongoeco installed but its wire server does not import (log: $LOG_DIR/mongoeco.log)"
    say mongoeco "installed mongoeco $version ('$MONGOECO_REQUIREMENT') into ${MONGOECO_VENV#"$ROOT"/} with $python ($((SECONDS - start)) s)"
}

install_micropython() {
    local entry="$NODE_PREFIX/node_modules/$MPY_PACKAGE/micropython.mjs" start
    if [ -f "$entry" ] && command -v node >/dev/null; then
        say micropython "$MPY_PACKAGE already installed in ${NODE_PREFIX#"$ROOT"/}"
        return
    fi
    start=$SECONDS
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    mkdir -p "$NODE_PREFIX"
    npm install --prefix "$NODE_PREFIX" --no-audit --no-fund "$MPY_PACKAGE@$MPY_VERSION" \
        >"$LOG_DIR/npm.log" 2>&1 || {
        tail -n 20 "$LOG_DIR/npm.log" >&2
        die "npm install $MPY_PACKAGE@$MPY_VERSION failed (log: $LOG_DIR/npm.log)"
    }
    [ -f "$entry" ] || die "npm install finished but $entry is missing"
    say micropython "installed $MPY_PACKAGE@$MPY_VERSION into ${NODE_PREFIX#"$ROOT"/} ($((SECONDS - start)) s)"
}

main() {
    case "${1:-}" in
        install)
            mkdir -p "$LOG_DIR"
            install_apt_servers
            install_mongoeco
            install_micropython
            ;;
        *)
            printf 'usage: %s install\n' "$0" >&2
            exit 2
            ;;
    esac
}

main "$@"
