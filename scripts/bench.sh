#!/usr/bin/env bash
# canal vs uWebSockets.js vs node ws vs Django Channels, side by side in one run (issue 6).
#
#   scripts/bench.sh [--quick] [--append-docs] [--scenarios echo,fanout,idle,crosscheck]
#                    [--servers canal,uws,ws,django] [--rounds N]
#
# Builds canal and canal-bench (release), installs the peers (scripts/bench-peers.sh), then for
# each scenario starts each server fresh, pinned to CPU 0, and runs the load pinned to CPU 1, in
# rounds A B C D, A B C D, ... (--rounds, 2 by default), so ratios are taken within a round.
# Every server runs with its shipped defaults; the only flags are the bind address and daphne's
# --access-log (canal logs connects and disconnects by default; daphne only with that flag).
# Results: one JSON file per run in $RUN_DIR and a markdown report ($RUN_DIR/report.md), printed
# at the end; --append-docs appends it to docs/BENCHMARKS.md.
# --quick: tiny counts and seconds (a smoke run, about a minute or two).
# Traffic goes to 127.0.0.0/8 only; every load loop is bounded in time and count.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${CANAL_BENCH_VENV:-$HOME/.cache/canal/bench-venv}
QUICK=0 APPEND=0 ROUNDS=2
SCENARIOS=echo,fanout,idle,crosscheck
SERVERS=canal,uws,ws,django
CMDLINE="scripts/bench.sh $*"
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --append-docs) APPEND=1 ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 5 ] || { echo "--rounds must be 1..5" >&2; exit 2; }
command -v taskset >/dev/null || { echo "bench.sh: taskset (util-linux) is needed" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "bench.sh: needs 2 CPUs (server on CPU 0, load on CPU 1)" >&2; exit 1; }

if [ $QUICK = 1 ]; then
  ECHO_S=3 ECHO_CONNS=20
  FAN_RECV=100 FAN_RATE=50 FAN_S=1 FAN_STEPS=3
  IDLE_COUNTS=200,600 IDLE_PROCS=1 IDLE_SETTLE=5
  XC_S=3
else
  ECHO_S=10 ECHO_CONNS=100
  FAN_RECV=${FAN_RECV:-1000} FAN_RATE=${FAN_RATE:-50} FAN_S=3 FAN_STEPS=10
  IDLE_COUNTS=2000,6000,10000,14000,18000 IDLE_PROCS=2 IDLE_SETTLE=20
  XC_S=8
fi
RUN_DIR=${RUN_DIR:-$CARGO_TARGET_DIR/bench-runs/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RUN_DIR"
echo "bench.sh: results in $RUN_DIR"

cargo build --release -q -p canal -p canal-bench
CANAL=$CARGO_TARGET_DIR/release/canal
B=$CARGO_TARGET_DIR/release/canal-bench
scripts/bench-peers.sh

PORT=18400
SPID=
start_server() { # name tag
  local name=$1 tag=$2 log="$RUN_DIR/server-$1-$2.log"
  PORT=$((PORT + 1))
  case $name in
    canal) taskset -c 0 "$CANAL" serve --bind "127.0.0.1:$PORT" >"$log" 2>&1 & ;;
    uws) taskset -c 0 node bench/peers/node/uws.js "$PORT" >"$log" 2>&1 & ;;
    ws) taskset -c 0 node bench/peers/node/ws.js "$PORT" >"$log" 2>&1 & ;;
    django)
      (cd bench/peers/django && exec taskset -c 0 "$VENV/bin/daphne" -b 127.0.0.1 -p "$PORT" \
        --access-log - benchpeer.asgi:application) >"$log" 2>&1 & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SPID=$!
  local i
  for i in $(seq 1 150); do
    if curl -fsS -m 1 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.2
  done
  echo "bench.sh: $name did not answer /health on port $PORT; log:" >&2
  tail -20 "$log" >&2
  stop_server
  return 1
}
stop_server() {
  [ -n "$SPID" ] || return 0
  kill "$SPID" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
  SPID=
}
trap 'stop_server' EXIT INT TERM
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

IFS=, read -r -a SRV <<<"$SERVERS"
has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

run_scenario() { # scenario round server
  local sc=$1 r=$2 s=$3 out="$RUN_DIR/$1-$3-r$2.json"
  start_server "$s" "$sc-r$r" || { echo '{"error":"server did not start"}' >"$out"; return 0; }
  local url="ws://127.0.0.1:$PORT"
  echo "== $sc round $r: $s (pid $SPID, port $PORT)"
  case $sc in
    echo)
      timeout $((ECHO_S + 60)) taskset -c 1 "$B" --json echo --url "$url/ws/echo/" \
        --connections "$ECHO_CONNS" --duration "$ECHO_S" --size 32 --server-pid "$SPID" >"$out" || true ;;
    fanout)
      timeout 900 taskset -c 1 "$B" --json fanout --url "$url/ws/chat/bench/" --receivers "$FAN_RECV" \
        --rate "$FAN_RATE" --duration "$FAN_S" --ramp --max-steps "$FAN_STEPS" --size 32 \
        --server-pid "$SPID" >"$out" || true ;;
    idle)
      timeout 1200 taskset -c 1 "$B" --json idle --url "$url" --server-pid "$SPID" --counts "$IDLE_COUNTS" \
        --rooms 100 --sources 127.0.0.1-4 --processes "$IDLE_PROCS" --settle-max "$IDLE_SETTLE" \
        >"$out" || true ;;
    crosscheck)
      local t0 t1
      t0=$(cpu_ticks "$SPID")
      timeout $((XC_S + 30)) taskset -c 1 node bench/peers/node/echo-client.js "$url/ws/echo/" \
        "$ECHO_CONNS" "$XC_S" >"$out.tmp" || true
      t1=$(cpu_ticks "$SPID")
      python3 - "$out.tmp" "$t0" "$t1" "$(getconf CLK_TCK)" "$XC_S" >"$out" <<'PY'
import json, sys
p, t0, t1, hz, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    v = json.loads(open(p).read().strip().splitlines()[-1])
except Exception as e:
    v = {"error": f"node client: {e}"}
# server CPU over the whole client run (connect + warm-up included), per measured round trip
v["server_cpu_s_whole_run"] = (t1 - t0) / hz
print(json.dumps(v))
PY
      rm -f "$out.tmp" ;;
  esac
  [ -s "$out" ] || echo '{"error":"no output"}' >"$out"
  stop_server
}

for sc in echo fanout idle crosscheck; do
  has "$sc" || continue
  rounds=$ROUNDS
  servers=("${SRV[@]}")
  # idle: memory does not drift like throughput; one round. crosscheck: canal vs uWS only.
  [ "$sc" = idle ] && rounds=1
  [ "$sc" = crosscheck ] && servers=(canal uws)
  for r in $(seq 1 "$rounds"); do
    for s in "${servers[@]}"; do run_scenario "$sc" "$r" "$s"; done
  done
done

{
  echo "## $(date -u +%Y-%m-%d): canal vs peers (scripts/bench.sh)"
  echo
  echo "Command: \`$CMDLINE\` ($([ $QUICK = 1 ] && echo quick || echo full) mode, $ROUNDS rounds)"
  echo
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), open files $(ulimit -n)"
  echo "- versions: canal $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench || echo '+dirty'), $(rustc --version | cut -d' ' -f1-2), node $(node --version), $(node -p "'uws-js-unofficial ' + require('./bench/peers/node/node_modules/@trufflesuite/uws-js-unofficial/package.json').version + ', ws ' + require('./bench/peers/node/node_modules/ws/package.json').version"), $("$VENV/bin/python" -c 'import sys, channels, daphne, django; print(f"python {sys.version.split()[0]}, channels {channels.__version__}, daphne {daphne.__version__}, django {django.__version__}")')"
  echo "- pinning: server \`taskset -c 0\`, load generator \`taskset -c 1\`; each server started fresh for each measurement"
  echo "- server flags: canal \`serve --bind\`; uWS.js and ws: port only; daphne \`-b -p --access-log -\`. Logs go to files."
  echo
  python3 bench/report.py "$RUN_DIR"
} >"$RUN_DIR/report.md"
cat "$RUN_DIR/report.md"
if [ $APPEND = 1 ]; then
  { echo; cat "$RUN_DIR/report.md"; } >>docs/BENCHMARKS.md
  echo "bench.sh: appended to docs/BENCHMARKS.md"
fi
