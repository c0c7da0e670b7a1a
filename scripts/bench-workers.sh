#!/usr/bin/env bash
# canal serve --workers N holding many idle chat connections over a private Redis (issue 6).
#
#   scripts/bench-workers.sh [--quick] [--append-docs] [--workers N] [--connections N]
#                            [--rooms N] [--clients N] [--sources A-B] [--concurrency N]
#                            [--canal-arg ARG]...   (passed to `canal serve`, listed in the report)
#
# Default: 6 worker processes, 100,000 connections in 1,000 rooms (`/ws/chat/room-{i % 1000}/`),
# held by 8 canal-bench client processes (12,500 sockets each: the cap here is 20,000 open files
# per process) bound to source addresses 127.0.0.2-9 (12,500 each: the ephemeral range holds
# about 28,000 per source). Steps: 20,000, 60,000, 100,000 connections.
#
# What it checks:
# - every connection got its own first message back through its room (canal-bench idle:
#   `failed` and `no echo` stay 0, nothing dropped while held);
# - then one message is published into every room (`POST /api/publish`, one group send per
#   room, the rooms together holding every connection) and every connection must receive it;
# - every worker's `canal_dropped_messages_total` stays 0 (each worker's /metrics is read by
#   opening fresh connections until all N have answered: SO_REUSEPORT picks by source port).
# What it reports: RSS per worker and in all, bytes per connection (slope of the workers'
# summed VmRSS between steps), connect rate, time for the group send to reach everyone,
# connections per worker, CPU time of the workers and of redis-server.
#
# Pinning (2 CPUs): the supervisor, its workers and redis-server on CPU 0 (`taskset -c 0`,
# inherited by the workers), canal-bench and its client processes on CPU 1.
# canal runs with its shipped defaults (access log on, to a file) plus --workers, --layer,
# --bind and --publish-token. Every wait is bounded; the run stops by itself.
# --quick: 2 workers, 2,000 connections, 20 rooms, 2 clients (a smoke run, seconds).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CMDLINE="scripts/bench-workers.sh $*"
EXTRA=()
WORKERS=6 CONNS=100000 ROOMS=1000 CLIENTS=8 SOURCES=127.0.0.2-9 CONCURRENCY=16 APPEND=0 QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 WORKERS=2 CONNS=2000 ROOMS=20 CLIENTS=2 SOURCES=127.0.0.2-3 ;;
    --append-docs) APPEND=1 ;;
    --workers) WORKERS=$2; shift ;;
    --connections) CONNS=$2; shift ;;
    --rooms) ROOMS=$2; shift ;;
    --clients) CLIENTS=$2; shift ;;
    --sources) SOURCES=$2; shift ;;
    --concurrency) CONCURRENCY=$2; shift ;;
    --canal-arg) EXTRA+=("$2"); shift ;;
    *) echo "bench-workers.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for tool in taskset redis-server redis-cli curl python3; do
  command -v $tool >/dev/null || { echo "bench-workers.sh: $tool is needed" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-workers.sh: needs 2 CPUs" >&2; exit 1; }
COUNTS=$((CONNS / 5)),$((CONNS * 3 / 5)),$CONNS
RUN_DIR=${RUN_DIR:-$CARGO_TARGET_DIR/bench-runs/workers-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RUN_DIR"
echo "bench-workers.sh: results in $RUN_DIR"

cargo build --release -q -p canal -p canal-bench
CANAL=$CARGO_TARGET_DIR/release/canal
B=$CARGO_TARGET_DIR/release/canal-bench
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RPID= SUP=
cleanup() {
  local p
  for p in $SUP $RPID; do kill "$p" 2>/dev/null || true; done
  for p in $SUP $RPID; do
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

RPORT=$(free_port)
taskset -c 0 redis-server --bind 127.0.0.1 --port "$RPORT" --save '' --appendonly no \
  >"$RUN_DIR/redis.log" 2>&1 &
RPID=$!
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$RPORT" ping >/dev/null || { echo "redis-server did not start" >&2; exit 1; }

PORT=$(free_port)
TOKEN=bench-$RANDOM$RANDOM
taskset -c 0 "$CANAL" serve --workers "$WORKERS" --layer "redis://127.0.0.1:$RPORT" \
  --bind "127.0.0.1:$PORT" --publish-token "$TOKEN" ${EXTRA[@]+"${EXTRA[@]}"} >"$RUN_DIR/canal.log" 2>&1 &
SUP=$!
for _ in $(seq 1 300); do
  grep -q "canal serving" "$RUN_DIR/canal.log" && break
  kill -0 "$SUP" 2>/dev/null || break
  sleep 0.2
done
grep -q "canal serving" "$RUN_DIR/canal.log" || { echo "canal did not start:" >&2; tail "$RUN_DIR/canal.log" >&2; exit 1; }
PIDS=$(pgrep -P "$SUP" | paste -sd, -)
[ "$(echo "$PIDS" | tr ',' '\n' | grep -c .)" = "$WORKERS" ] || { echo "expected $WORKERS workers, found $PIDS" >&2; exit 1; }
echo "== supervisor $SUP, workers $PIDS on port $PORT, redis $RPID on port $RPORT"

cpu_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $s; }
# Reads every worker's /metrics: fresh connections (fresh source ports) until all answered.
scrape_all() { # phase
  local seen=0 i w
  for i in $(seq 1 $((WORKERS * 200))); do
    curl -fsS -m 5 -D "$RUN_DIR/h.tmp" -o "$RUN_DIR/m.tmp" "http://127.0.0.1:$PORT/metrics" || continue
    w=$(awk -F': ' 'tolower($1)=="x-canal-worker" {print $2}' "$RUN_DIR/h.tmp" | tr -d '\r')
    [ -n "$w" ] || continue
    [ -f "$RUN_DIR/metrics-$1-w$w.txt" ] || { mv "$RUN_DIR/m.tmp" "$RUN_DIR/metrics-$1-w$w.txt"; seen=$((seen + 1)); }
    [ $seen = "$WORKERS" ] && break
  done
  rm -f "$RUN_DIR/h.tmp" "$RUN_DIR/m.tmp"
  [ $seen = "$WORKERS" ] || echo "bench-workers.sh: only $seen of $WORKERS workers answered /metrics ($1)" >&2
}

IFS=, read -r -a PID_LIST <<<"$PIDS"
W0=$(cpu_ticks "${PID_LIST[@]}") R0=$(cpu_ticks "$RPID") T0=$(date +%s.%N)
timeout 1800 taskset -c 1 "$B" --json idle --url "ws://127.0.0.1:$PORT" --server-pid "$PIDS" \
  --counts "$COUNTS" --rooms "$ROOMS" --sources "$SOURCES" --processes "$CLIENTS" \
  --concurrency "$CONCURRENCY" --settle-max 20 \
  --publish-url "http://127.0.0.1:$PORT/api/publish" --publish-token "$TOKEN" \
  >"$RUN_DIR/idle.json" || echo "bench-workers.sh: canal-bench idle reported an error" >&2
W1=$(cpu_ticks "${PID_LIST[@]}") R1=$(cpu_ticks "$RPID") T1=$(date +%s.%N)
scrape_all after
STILL=$(pgrep -P "$SUP" | paste -sd, -)

CANAL_EXTRA_ARGS="${EXTRA[*]-}" python3 - "$RUN_DIR" "$WORKERS" "$PIDS" "$STILL" "$((W1 - W0))" "$((R1 - R0))" "$(getconf CLK_TCK)" \
  "$(echo "$T1 - $T0" | awk '{print $1 - $3}')" "$CMDLINE" "$SOURCES" "$CLIENTS" "$CONCURRENCY" \
  >"$RUN_DIR/report.md" <<'PY'
import glob, json, os, re, subprocess, sys
(run, workers, pids, still, wticks, rticks, hz, secs, cmd, sources, clients, conc) = sys.argv[1:]
hz = int(hz)
try:
    v = json.load(open(f"{run}/idle.json"))
except Exception as e:
    v = {"error": f"no canal-bench result: {e}"}
def metric(text, name, labels=None):
    total = 0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels and labels not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total
per = {}
for path in sorted(glob.glob(f"{run}/metrics-after-w*.txt")):
    w = int(re.search(r"-w(\d+)\.txt$", path).group(1))
    text = open(path).read()
    per[w] = {
        "accepted": int(metric(text, "canal_websocket_accepted_total")),
        "dropped": int(metric(text, "canal_dropped_messages_total")),
        "restarts": int(metric(text, "canal_worker_restarts")),
        "pid": re.search(r'canal_worker_info\{worker="\d+",pid="(\d+)"\}', text).group(1),
    }
steps = v.get("steps") or []
last = steps[-1] if steps else {}
g = v.get("group_send") or {}
rss = v.get("server_rss_per_process_kb") or []
total_rss = sum(r for r in rss if r) if rss else None
held = last.get("connections")
dropped = sum(p["dropped"] for p in per.values())
ok = (not v.get("error")) and held == steps[-1].get("target") and dropped == 0 \
    and g.get("reached") == held and len(per) == int(workers) and pids == still
date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
cpu = open("/proc/cpuinfo").read()
model = re.search(r"model name\s*:\s*(.*)", cpu)
mem = int(re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()).group(1)) / 1048576
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"## {date[:10]}: `canal serve --workers {workers}`, {held or 0:,} idle connections over Redis (scripts/bench-workers.sh)")
print()
print(f"Command: `{cmd}`; {date}, canal {rev}.")
print()
print(f"- machine: {os.cpu_count()} CPUs ({model.group(1) if model else '?'}), {mem:.1f} GiB, Linux {os.uname().release}, open files per process 20,000 (hard cap)")
print(f"- pinning: the supervisor, its {workers} workers and redis-server share CPU 0 (`taskset -c 0`); canal-bench and its {clients} client processes share CPU 1")
print(f"- canal: `serve --workers {workers} --layer redis://127.0.0.1:PORT --bind 127.0.0.1:PORT --publish-token …{(' ' + os.environ['CANAL_EXTRA_ARGS']) if os.environ.get('CANAL_EXTRA_ARGS') else ''}`, otherwise shipped defaults (access log on, to a file); a private redis-server (no persistence)")
print(f"- load: `canal-bench idle --rooms {v.get('rooms')} --processes {clients} --sources {sources} --concurrency {conc} --publish-url …`: each client joins `/ws/chat/room-{{i % rooms}}/`, sends one message and counts as connected once that message came back through its room")
print()
print("| connections | workers' RSS, sum (kB) | connect s | connections/s | failed | no echo | dropped while held |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for s in steps:
    print(f"| {s.get('connections'):,} | {s.get('server_rss_kb')} | {s.get('connect_s')} | {s.get('connect_rate_per_s')} | {s.get('failed')} | {s.get('no_echo')} | {s.get('dropped')} |")
print()
print(f"- **held {held or 0:,} connections** over {workers} workers; messages the server dropped (`canal_dropped_messages_total`, summed over the workers, all reasons): **{dropped}**")
print(f"- per worker (connections accepted, RSS at the top step): " + ", ".join(
    f"w{w} pid {p['pid']}: {p['accepted']:,} / {r:,} kB" for (w, p), r in zip(sorted(per.items()), rss + [0] * 99)) )
print(f"- RSS of all workers at the top step: {total_rss:,} kB ({(total_rss or 0) / 1024:.0f} MiB); per connection, slope between steps: {v.get('bytes_per_connection_first_last')} B (first to last), {v.get('bytes_per_connection_least_squares')} B (least squares); before the load {v.get('server_rss_before_kb')} kB")
print(f"- connect rate: {v.get('connect_rate_per_s')} connections/s overall (upgrade + join + own message back through the room, across Redis)")
print(f"- group send: one message published into each of {g.get('rooms')} rooms (the rooms hold every connection; publishing took {g.get('publish_s')} s); **reached {g.get('reached')} of {g.get('expected')}** connections; the last arrived {g.get('last_arrival_s')} s after the first publish")
print(f"- CPU over the run ({float(secs):.0f} s): workers {int(wticks) / hz:.1f} s, redis-server {int(rticks) / hz:.1f} s")
print(f"- worker restarts during the run: {sum(p['restarts'] for p in per.values())}; same worker pids at the end: {'yes' if pids == still else 'no'}")
print(f"- closed cleanly at the end: {v.get('closed_cleanly')}/{v.get('closed_total')}")
if v.get("error"):
    print(f"- error: {v['error']}")
print()
print("Result: " + ("**pass**: every connection held, none dropped, the group send reached all." if ok else "**fail** (see above)."))
PY
cat "$RUN_DIR/report.md"
if [ $APPEND = 1 ] && [ $QUICK = 0 ]; then
  { echo; cat "$RUN_DIR/report.md"; } >>docs/BENCHMARKS.md
  echo "bench-workers.sh: appended to docs/BENCHMARKS.md"
fi
grep -q '^Result: \*\*pass' "$RUN_DIR/report.md"
