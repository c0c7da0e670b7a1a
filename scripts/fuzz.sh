#!/usr/bin/env bash
# Property harness over the parsers clients reach (WebSocket frames, upgrade headers, routes,
# channel/group names, msgpack): random and mutated inputs for SECONDS per target (default 60),
# release build. Not part of CI. Usage: scripts/fuzz.sh [SECONDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
cargo run --release --example fuzz -- "$secs" "$@"
