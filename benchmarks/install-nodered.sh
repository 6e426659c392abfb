#!/usr/bin/env bash
# Install Node-RED and node-red-contrib-influxdb into .cache/nodered for the benchmark (npm, pinned).
# Idempotent: does nothing when the pinned versions are there. Needs node and npm (deploy/test-servers.sh
# installs them with the MicroPython runtime).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/.cache/nodered"
NODE_RED_VERSION=4.1.8              # 5.x needs node >= 22; Debian 12 ships 18
INFLUXDB_NODES_VERSION=0.7.0
LOG="$ROOT/.cache/install-logs/nodered.log"

installed() {
    node -e '
const [dir, want] = process.argv.slice(1);
const v = require(dir + "/package.json").version;
process.exit(v === want ? 0 : 1);' "$PREFIX/node_modules/$1" "$2" 2>/dev/null
}

command -v node >/dev/null && command -v npm >/dev/null || { echo "nodered: node and npm are needed (run deploy/test-servers.sh install)" >&2; exit 1; }
if installed node-red "$NODE_RED_VERSION" && installed node-red-contrib-influxdb "$INFLUXDB_NODES_VERSION"; then
    printf '%-12s %s\n' "nodered:" "node-red $NODE_RED_VERSION, node-red-contrib-influxdb $INFLUXDB_NODES_VERSION already installed"
    exit 0
fi
mkdir -p "$PREFIX" "$(dirname "$LOG")"
start=$SECONDS
npm install --prefix "$PREFIX" --no-audit --no-fund "node-red@$NODE_RED_VERSION" \
    "node-red-contrib-influxdb@$INFLUXDB_NODES_VERSION" >"$LOG" 2>&1 || {
    tail -n 20 "$LOG" >&2
    echo "nodered: npm install failed (log: $LOG)" >&2
    exit 1
}
printf '%-12s %s\n' "nodered:" "installed node-red $NODE_RED_VERSION, node-red-contrib-influxdb $INFLUXDB_NODES_VERSION ($((SECONDS - start)) s)"
