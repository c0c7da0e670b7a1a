#!/usr/bin/env bash
# Run the Autobahn|Testsuite cases against canal's echo endpoint (/ws/echo/).
#
#   scripts/autobahn.sh [PATTERN ...]
#
# PATTERN is a case id or `*` glob (e.g. 9.* or 7.1.5); a leading `!` excludes
# (e.g. '!9.1.6'). With no include pattern, runs cases 1.* .. 10.* (those that
# exist: the suite has no 8.* or 11.*) and excludes 12.* / 13.* (compression).
#
# The suite is driven by kosoku (PyPI), which runs Autobahn's own case files
# under Python 3 and writes reports in Autobahn's index.json format; it is
# installed into a venv outside the repo. Exit status: 0 only if every case
# passed (see scripts/autobahn_gate.py).
#
# Environment:
#   CARGO_TARGET_DIR       honoured for the build (default: cargo's own)
#   AUTOBAHN_VENV          venv path (default: $HOME/.cache/canal/autobahn-venv)
#   AUTOBAHN_OUTDIR        report dir (default: <target dir>/autobahn), wiped first
#   AUTOBAHN_PARALLELISM   cases run in parallel (default: 2)
#   AUTOBAHN_TIMEOUT       seconds allowed for the whole suite (default: 900)
#   AUTOBAHN_SERVER_ARGS   extra `canal serve` flags (word-split)
#   AUTOBAHN_NO_BUILD=1    skip `cargo build` (use the binary already built)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KOSOKU_VERSION=0.1.0
VENV="${AUTOBAHN_VENV:-$HOME/.cache/canal/autobahn-venv}"
PARALLELISM="${AUTOBAHN_PARALLELISM:-2}"
SUITE_TIMEOUT="${AUTOBAHN_TIMEOUT:-900}"

log() { printf 'autobahn.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 not found"
command -v timeout >/dev/null || die "timeout (coreutils) not found"

# ---------------------------------------------------------------- kosoku venv
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true)"
if [[ "$have" != "$KOSOKU_VERSION" ]]; then
    log "installing kosoku==$KOSOKU_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
fi
KOSOKU="$VENV/bin/kosoku"
[[ -x "$KOSOKU" ]] || die "kosoku not found in $VENV"

# --------------------------------------------------------------------- build
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [[ "${AUTOBAHN_NO_BUILD:-0}" != 1 ]]; then
    log "building canal (release) into $TARGET_DIR"
    cargo build --release --bin canal
fi
CANAL="$TARGET_DIR/release/canal"
[[ -x "$CANAL" ]] || die "no binary at $CANAL"

OUTDIR="${AUTOBAHN_OUTDIR:-$TARGET_DIR/autobahn}"

# ------------------------------------------------------------- case patterns
includes=()
excludes=()
for p in "$@"; do
    if [[ "$p" == '!'* ]]; then excludes+=("${p#!}"); else includes+=("$p"); fi
done
if ((${#includes[@]} == 0)); then
    # Only majors the suite has: kosoku rejects a pattern that matches nothing.
    mapfile -t includes < <("$VENV/bin/python" -c '
from kosoku.cases import GROUPS
for major in sorted(GROUPS, key=int):
    if 1 <= int(major) <= 10:
        print(major + ".*")
')
    excludes+=("12.*" "13.*")
fi
kargs=()
for p in "${includes[@]}"; do kargs+=(-i "$p"); done
for p in "${excludes[@]}"; do kargs+=(-x "$p"); done

# -------------------------------------------------------------------- server
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
SERVER_LOG="$(mktemp -t canal-autobahn-server.XXXXXX.log)"
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# shellcheck disable=SC2086  # AUTOBAHN_SERVER_ARGS is meant to be word-split
"$CANAL" serve --bind "127.0.0.1:$PORT" \
    --max-message-size 16777216 --max-frame-size 16777216 --no-access-log \
    ${AUTOBAHN_SERVER_ARGS:-} >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
log "canal pid $SERVER_PID on 127.0.0.1:$PORT (log: $SERVER_LOG)"

ready=0
for _ in $(seq 1 100); do   # up to ~10 s
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG" >&2; die "canal exited during startup"; }
    if python3 - "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
    then ready=1; break; fi
    sleep 0.1
done
((ready)) || { cat "$SERVER_LOG" >&2; die "canal did not answer /health on port $PORT"; }

# --------------------------------------------------------------------- suite
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
log "kosoku ${kargs[*]} -p $PARALLELISM -> $OUTDIR (timeout ${SUITE_TIMEOUT}s)"
start=$(date +%s)
set +e
timeout --kill-after=10 "$SUITE_TIMEOUT" \
    "$KOSOKU" "ws://127.0.0.1:$PORT/ws/echo/" "${kargs[@]}" -p "$PARALLELISM" -o "$OUTDIR" \
    >"$OUTDIR/kosoku.log" 2>&1
krc=$?
set -e
elapsed=$(( $(date +%s) - start ))
log "kosoku exited $krc after ${elapsed}s (log: $OUTDIR/kosoku.log)"

server_alive=1
kill -0 "$SERVER_PID" 2>/dev/null || server_alive=0
stop_server
cp "$SERVER_LOG" "$OUTDIR/canal.log" 2>/dev/null && rm -f "$SERVER_LOG"

status=0
if ((krc == 124 || krc == 137)); then
    log "error: suite timed out after ${SUITE_TIMEOUT}s"
    status=1
elif ((krc != 0 && krc != 1)); then
    # 1 means "some case failed" (the gate reports which); anything else is a crash.
    tail -n 20 "$OUTDIR/kosoku.log" >&2
    log "error: kosoku failed (exit $krc)"
    status=1
fi
if ((!server_alive)); then
    tail -n 20 "$OUTDIR/canal.log" >&2
    log "error: canal died during the suite"
    status=1
fi
if [[ ! -f "$OUTDIR/index.json" ]]; then
    tail -n 20 "$OUTDIR/kosoku.log" >&2
    die "no report written ($OUTDIR/index.json missing)"
fi

python3 "$ROOT/scripts/autobahn_gate.py" "$OUTDIR" || status=1
if ((krc == 1 && status == 0)); then
    log "error: kosoku reported failures the gate did not see"
    status=1
fi
exit "$status"
