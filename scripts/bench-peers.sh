#!/usr/bin/env bash
# Install the benchmark peers of issue 6 from the registries (npm, PyPI). Idempotent.
#   bench/peers/node:   uWebSockets.js (@trufflesuite/uws-js-unofficial, Node 20 addon) and ws 8,
#                       from package-lock.json (node_modules is git-ignored)
#   bench/peers/django: Django Channels 4 + daphne (+ channels_redis) in a venv outside the repo,
#                       $CANAL_BENCH_VENV (default ~/.cache/canal/bench-venv), from requirements.lock
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CANAL_BENCH_VENV:-$HOME/.cache/canal/bench-venv}

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" != 20 ]; then
  echo "bench-peers: node $node_major found; the uWebSockets.js peer ships a native addon for node 20 only" >&2
  exit 1
fi
(cd "$ROOT/bench/peers/node" && { [ -d node_modules/ws ] && [ -d node_modules/@trufflesuite ] || npm ci --no-audit --no-fund; })
# The addon must load natively (no pure-JS fallback).
node -e "require('$ROOT/bench/peers/node/node_modules/@trufflesuite/uws-js-unofficial/dist/uws_linux_x64_' + process.versions.modules + '.node')"

if [ ! -x "$VENV/bin/daphne" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/bench/peers/django/requirements.lock"
fi
"$VENV/bin/python" -c 'import channels, daphne, django; print("peers ok: channels", channels.__version__, "daphne", daphne.__version__, "django", django.__version__)'
