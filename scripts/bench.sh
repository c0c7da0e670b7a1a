#!/usr/bin/env bash
# canal vs uWebSockets.js vs node ws vs Django Channels, side by side in one run (issue 6).
#
#   scripts/bench.sh [--quick] [--append-docs] [--scenarios echo,fanout,idle,crosscheck,redis]
#                    [--servers canal,uws,ws,django] [--rounds N]
#
# Builds canal and canal-bench (release), installs the peers (scripts/bench-peers.sh), then for
# each scenario starts each server fresh, pinned to CPU 0, and runs the load pinned to CPU 1, in
# rounds A B C D, A B C D, ... (--rounds, 2 by default), so ratios are taken within a round.
# Every server runs with its shipped defaults; the only flags are the bind address and daphne's
# --access-log (canal logs connects and disconnects by default; daphne only with that flag).
# Results: one JSON file per run in $RUN_DIR and a markdown report ($RUN_DIR/report.md), printed
# at the end; --append-docs appends it to docs/BENCHMARKS.md.
# --quick: tiny counts and seconds (a smoke run, about 3 minutes with every scenario).
# redis (not in the default set): canal vs Django Channels + channels_redis. A private
# redis-server on a free loopback port and three server processes sharing it, all on CPU 0;
# receivers are split between processes A and B, the sender talks to process C, so every
# delivery crosses Redis. The load is on CPU 1. Server CPU is the sum over the three servers and
# redis-server for the whole run, divided by all deliveries.
# Fan-out sizes (full mode): FAN_RECV receivers (1000), a ramp from FAN_RATE msg/s (50) of at
# most FAN_STEPS steps (10) of FAN_S seconds (3). FAN_STEPS=1 measures one fixed rate: at a rate
# where neither server is saturated, CPU per delivery compares their efficiency.
# Traffic goes to 127.0.0.0/8 only; every load loop is bounded in time and count.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${CANAL_BENCH_VENV:-$HOME/.cache/canal/bench-venv}
QUICK=0 APPEND=0 ROUNDS=2
SCENARIOS=echo,fanout,idle,crosscheck
SERVERS=canal,uws,ws,django
ARGS="$*"
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
# The report names the exact command, with the sizes a full run takes from the environment.
ENVS=
if [ $QUICK = 0 ]; then
  for v in FAN_RECV FAN_RATE FAN_RATE_DJANGO FAN_STEPS FAN_S RED_RECV RED_RATE; do
    if [ -n "${!v:-}" ]; then ENVS+="$v=${!v} "; fi
  done
fi
CMDLINE="${ENVS}scripts/bench.sh $ARGS"
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 5 ] || { echo "--rounds must be 1..5" >&2; exit 2; }
command -v taskset >/dev/null || { echo "bench.sh: taskset (util-linux) is needed" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "bench.sh: needs 2 CPUs (server on CPU 0, load on CPU 1)" >&2; exit 1; }

if [ $QUICK = 1 ]; then
  ECHO_S=3 ECHO_CONNS=20
  FAN_RECV=100 FAN_RATE=50 FAN_RATE_DJANGO=5 FAN_S=1 FAN_STEPS=3
  IDLE_COUNTS=200,600 IDLE_PROCS=1 IDLE_SETTLE=5
  XC_S=3
  RED_RECV=100 RED_RATE=1 RED_STEPS=3
else
  ECHO_S=10 ECHO_CONNS=100
  FAN_RECV=${FAN_RECV:-1000} FAN_RATE=${FAN_RATE:-50} FAN_RATE_DJANGO=${FAN_RATE_DJANGO:-2}
  FAN_S=${FAN_S:-3} FAN_STEPS=${FAN_STEPS:-10}
  IDLE_COUNTS=2000,6000,10000,14000,18000 IDLE_PROCS=2 IDLE_SETTLE=20
  XC_S=8
  RED_RECV=${RED_RECV:-1000} RED_RATE=${RED_RATE:-1} RED_STEPS=10
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
EXTRA_PIDS=()
stop_extra() {
  local p
  for p in "${EXTRA_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${EXTRA_PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  EXTRA_PIDS=()
}
trap 'stop_server; stop_extra' EXIT INT TERM
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Busy ticks of the whole machine (all CPUs, every process): user nice system irq softirq steal.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# Adds machine_busy_pct (all processes, of 100 % per CPU) over the load run to a result file, so
# a measurement disturbed by other work on the box shows: busy well above server + generator.
add_machine_busy() { # file ticks0 ticks1 seconds
  python3 - "$@" <<'PY'
import json, os, sys
p, t0, t1, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    v = json.load(open(p))
except Exception:
    sys.exit(0)
v["machine_busy_pct"] = round((t1 - t0) * 100 / os.sysconf("SC_CLK_TCK") / max(secs, 1e-3), 1)
json.dump(v, open(p, "w"))
PY
}

IFS=, read -r -a SRV <<<"$SERVERS"
has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

run_scenario() { # scenario round server
  local sc=$1 r=$2 s=$3 out="$RUN_DIR/$1-$3-r$2.json"
  start_server "$s" "$sc-r$r" || { echo '{"error":"server did not start"}' >"$out"; return 0; }
  local url="ws://127.0.0.1:$PORT" m0 m1 w0 w1
  echo "== $sc round $r: $s (pid $SPID, port $PORT)"
  m0=$(machine_ticks) w0=$(date +%s.%N)
  case $sc in
    echo)
      timeout $((ECHO_S + 60)) taskset -c 1 "$B" --json echo --url "$url/ws/echo/" \
        --connections "$ECHO_CONNS" --duration "$ECHO_S" --size 32 --server-pid "$SPID" >"$out" || true ;;
    fanout)
      # Each server is measured at its own highest zero-loss rate; Django's ramp starts lower
      # (the same doubling), because it cannot take the others' first step.
      local rate=$FAN_RATE
      [ "$s" = django ] && rate=$FAN_RATE_DJANGO
      timeout 900 taskset -c 1 "$B" --json fanout --url "$url/ws/chat/bench/" --receivers "$FAN_RECV" \
        --rate "$rate" --duration "$FAN_S" --ramp --max-steps "$FAN_STEPS" --size 32 \
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
  m1=$(machine_ticks) w1=$(date +%s.%N)
  add_machine_busy "$out" "$m0" "$m1" "$(echo "$w1 - $w0" | awk '{print $1 - $3}')"
  stop_server
}

wait_health() { # port pid
  local i
  for i in $(seq 1 150); do
    curl -fsS -m 1 "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

run_redis() { # round server
  local r=$1 s=$2 out="$RUN_DIR/redis-$2-r$1.json" log="$RUN_DIR/server-$2-redis-r$1"
  PORT=$((PORT + 1))
  local rport=$PORT
  taskset -c 0 redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no \
    >"$log-redis.log" 2>&1 &
  local rpid=$!
  EXTRA_PIDS+=("$rpid")
  for _ in $(seq 1 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
  local ports=() pids=() k
  for k in a b c; do
    PORT=$((PORT + 1))
    ports+=("$PORT")
    case $s in
      canal) taskset -c 0 "$CANAL" serve --bind "127.0.0.1:$PORT" --layer "redis://127.0.0.1:$rport" \
        >"$log-$k.log" 2>&1 & ;;
      django)
        (cd bench/peers/django && CHANNELS_LAYER=redis CHANNELS_REDIS_URL="redis://127.0.0.1:$rport" \
          exec taskset -c 0 "$VENV/bin/daphne" -b 127.0.0.1 -p "$PORT" --access-log - \
          benchpeer.asgi:application) >"$log-$k.log" 2>&1 & ;;
      *) echo "redis scenario: canal or django only" >&2; return 0 ;;
    esac
    pids+=("$!")
    EXTRA_PIDS+=("$!")
  done
  for k in 0 1 2; do
    wait_health "${ports[$k]}" "${pids[$k]}" || { echo '{"error":"server did not start"}' >"$out"; stop_extra; return 0; }
  done
  echo "== redis round $r: $s (pids ${pids[*]}, redis $rpid on port $rport)"
  local t0 t1 u="ws://127.0.0.1"
  t0=$(for p in "${pids[@]}" "$rpid"; do cpu_ticks "$p"; done | awk '{s += $1} END {print s}')
  timeout 900 taskset -c 1 "$B" --json fanout --url "$u:${ports[2]}/ws/chat/bench/" \
    --receiver-urls "$u:${ports[0]}/ws/chat/bench/,$u:${ports[1]}/ws/chat/bench/" \
    --receivers "$RED_RECV" --rate "$RED_RATE" --duration "$FAN_S" --ramp --max-steps "$RED_STEPS" \
    --size 32 --server-pid "${pids[0]}" >"$out.tmp" || true
  t1=$(for p in "${pids[@]}" "$rpid"; do cpu_ticks "$p"; done | awk '{s += $1} END {print s}')
  python3 - "$out.tmp" "$t0" "$t1" "$(getconf CLK_TCK)" >"$out" <<'PY'
import json, sys
p, t0, t1, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    v = json.load(open(p))
except Exception as e:
    v = {"error": f"canal-bench: {e}"}
cpu = (t1 - t0) / hz
d = sum(x.get("delivered", 0) for x in v.get("steps") or [])
v["all_servers_cpu_s"] = cpu
v["all_servers_cpu_us_per_delivery"] = round(cpu * 1e6 / d, 2) if d else None
print(json.dumps(v))
PY
  rm -f "$out.tmp"
  stop_extra
}

for sc in echo fanout idle crosscheck redis; do
  has "$sc" || continue
  rounds=$ROUNDS
  servers=("${SRV[@]}")
  # idle: memory does not drift like throughput; one round. crosscheck: canal vs uWS only.
  [ "$sc" = idle ] && rounds=1
  [ "$sc" = crosscheck ] && servers=(canal uws)
  [ "$sc" = redis ] && servers=(canal django)
  for r in $(seq 1 "$rounds"); do
    for s in "${servers[@]}"; do
      if [ "$sc" = redis ]; then run_redis "$r" "$s"; else run_scenario "$sc" "$r" "$s"; fi
    done
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
