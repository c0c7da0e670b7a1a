#!/usr/bin/env python3
"""Markdown report for a scripts/bench.sh run: reads RUN_DIR/{scenario}-{server}-r{round}.json.

Throughput and CPU ratios are taken within a round (canal vs each peer in the same round), and
the spread is the range over rounds. "gen-limited" marks a measurement where the load
generator's own CPU was at or above 90 % of its core. "machine busy" is the whole box's busy CPU
(every process, 200 % = both cores) over the run: far above server + generator means other work
on the machine disturbed that measurement.
"""

import glob
import json
import os
import re
import statistics
import sys

GEN_LIMIT_PCT = 90.0
# A server this busy at a fan-out step is saturated there: its CPU per delivery is about its busy
# share divided by the rate, whatever its efficiency.
SATURATED_PCT = 90.0
ORDER = ["canal", "uws", "ws", "django"]
NAMES = {"canal": "canal", "uws": "uWebSockets.js", "ws": "node ws", "django": "Django Channels"}


def load(run_dir):
    res = {}
    for p in glob.glob(os.path.join(run_dir, "*.json")):
        m = re.match(r"(\w+)-(\w+)-r(\d+)\.json$", os.path.basename(p))
        if not m:
            continue
        try:
            v = json.load(open(p))
        except Exception as e:  # a crashed run leaves partial output
            v = {"error": f"unreadable: {e}"}
        res.setdefault(m[1], {}).setdefault(m[2], {})[int(m[3])] = v
    return res


def servers(d):
    return [s for s in ORDER if s in d] + sorted(s for s in d if s not in ORDER)


def num(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 100:
        x = int(x)
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio_cell(rounds_a, rounds_b, key):
    """canal/peer ratio per common round: 'median (min–max)'."""
    rs = []
    for r in sorted(set(rounds_a) & set(rounds_b)):
        a, b = key(rounds_a[r]), key(rounds_b[r])
        if a is not None and b:
            rs.append(a / b)
    if not rs:
        return "-"
    def f(x):
        return f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"

    if len(rs) == 1:
        return f(rs[0])
    return f"{f(statistics.median(rs))} ({f(min(rs))}–{f(max(rs))})"


def others_pct(v):
    """CPU used by other processes during an echo run (machine busy minus server and generator)."""
    b, sv, cl = v.get("machine_busy_pct"), v.get("server_cpu_pct"), v.get("client_cpu_pct")
    if b is None or sv is None or cl is None:
        return None
    return b - sv - cl


def quiet(v, limit=20.0):
    o = others_pct(v)
    return o is not None and o <= limit


def echo(d):
    out = ["### echo: 100 connections, closed loop, 32-byte text", ""]
    out.append("| server | round trips/s (per round) | p50 ms | p99 ms | server CPU µs/rt | server CPU % | generator CPU % | machine busy % (per round) | note |")
    out.append("|---|---|---:|---:|---:|---:|---:|---|---|")
    for s in servers(d):
        rs = d[s]
        vals = [rs[r] for r in sorted(rs)]
        errs = [v.get("error") or (v.get("errors") or None) for v in vals]
        tp = " / ".join(num(v.get("round_trips_per_s")) for v in vals)
        gen = med([v.get("client_cpu_pct") for v in vals])
        note = []
        if gen is not None and gen >= GEN_LIMIT_PCT:
            note.append("gen-limited")
        if any(v.get("mismatches") for v in vals):
            note.append("MISMATCH")
        if any(errs):
            note.append(f"errors: {str([e for e in errs if e][0])[:80]}")
        out.append(
            f"| {NAMES.get(s, s)} | {tp} | {ms(med([v.get('latency', {}).get('p50_us') for v in vals]))} "
            f"| {ms(med([v.get('latency', {}).get('p99_us') for v in vals]))} "
            f"| {num(med([v.get('server_cpu_us_per_round_trip') for v in vals]), 2)} "
            f"| {num(med([v.get('server_cpu_pct') for v in vals]))} | {num(gen)} "
            f"| {' / '.join(num(v.get('machine_busy_pct')) for v in vals)} | {', '.join(note)} |"
        )
    out += ["", "Medians over rounds except the round trips/s column. Ratios canal / peer within each round, median (range);"
            " the last column keeps only the rounds where neither run was disturbed (other processes took at most 20 % of a core):", ""]
    out.append("| canal vs | round trips/s | server CPU per rt | p99 | quiet rounds: round trips/s, CPU per rt |")
    out.append("|---|---|---|---|---|")
    for s in servers(d):
        if s == "canal" or "canal" not in d:
            continue
        qa = {r: v for r, v in d["canal"].items() if quiet(v) and r in d[s] and quiet(d[s][r])}
        qb = {r: d[s][r] for r in qa}
        qcell = (f"{len(qa)} of {len(d['canal'])}: {ratio_cell(qa, qb, lambda v: v.get('round_trips_per_s'))}, "
                 f"{ratio_cell(qa, qb, lambda v: v.get('server_cpu_us_per_round_trip'))}") if qa else "none"
        if all(others_pct(v) is None for v in d["canal"].values()):
            qcell = "not recorded"
        out.append(
            f"| {NAMES.get(s, s)} | {ratio_cell(d['canal'], d[s], lambda v: v.get('round_trips_per_s'))} "
            f"| {ratio_cell(d['canal'], d[s], lambda v: v.get('server_cpu_us_per_round_trip'))} "
            f"| {ratio_cell(d['canal'], d[s], lambda v: (v.get('latency') or {}).get('p99_us'))} | {qcell} |"
        )
    return out


def fan_best(v):
    """The last clean step and the step that ended the ramp."""
    steps = v.get("steps") or []
    clean = [x for x in steps if x.get("clean")]
    best = max(clean, key=lambda x: x.get("rate", 0)) if clean else None
    fail = next((x for x in steps if not x.get("clean")), None)
    return best, fail


def why(x):
    if x is None:
        return "ramp ended without loss (max steps)"
    r = []
    if x.get("lost"):
        r.append(f"lost {x['lost']:,} ({x.get('receivers_with_loss', 0)} receivers)")
    if x.get("out_of_order"):
        r.append(f"{x['out_of_order']} out of order")
    if x.get("receivers_lost_during_step"):
        r.append(f"{x['receivers_lost_during_step']} receivers dropped")
    p99 = (x.get("latency") or {}).get("p99_us")
    if p99 and p99 > 1_000_000:
        r.append(f"p99 {p99 / 1000:.0f} ms")
    gen = x.get("client_cpu_pct")
    r.append(f"at {num(x.get('rate'))} msg/s, gen CPU {num(gen)} %")
    if gen is not None and gen >= GEN_LIMIT_PCT:
        r.append("**the generator was the limit**")
    return "; ".join(r)


def same_rate_steps(va, vb):
    """(rate, canal's step, peer's step) at the highest rate both ran clean, or None."""
    ca = {x.get("rate"): x for x in va.get("steps") or [] if x.get("clean")}
    cb = {x.get("rate"): x for x in vb.get("steps") or [] if x.get("clean")}
    common = sorted(set(ca) & set(cb))
    if not common:
        return None
    r = common[-1]
    return r, ca[r], cb[r]


def same_rate(va, vb, key):
    """(rate, canal/peer of `key(step)`) at the highest rate both ran clean."""
    steps = same_rate_steps(va, vb)
    if not steps:
        return None
    r, a, b = steps
    a, b = key(a), key(b)
    return (r, a / b) if a is not None and b else None


def both_saturated(ra, rb):
    """(rounds where both servers were SATURATED_PCT busy or more at the same-rate step, rounds)."""
    n = total = 0
    for r in sorted(set(ra) & set(rb)):
        steps = same_rate_steps(ra[r], rb[r])
        if not steps:
            continue
        total += 1
        busy = [x.get("server_cpu_pct") for x in steps[1:]]
        n += all(b is not None and b >= SATURATED_PCT for b in busy)
    return n, total


def step_cpu(x):
    return x.get("server_cpu_us_per_delivery")


def step_p99(x):
    return (x.get("latency") or {}).get("p99_us")


def fanout(d, redis=False):
    any_v = next(iter(next(iter(d.values())).values()))
    n = any_v.get("receivers", "?")
    n = num(n) if isinstance(n, int) else n
    if redis:
        out = [f"### Redis fan-out: {n} receivers split over server processes A and B, sender on C, all sharing one redis-server; rate doubling per step", ""]
    elif all(len(v.get("steps") or []) <= 1 for rs in d.values() for v in rs.values()):
        out = [f"### fan-out: {n} receivers in one room, 32 B, one fixed rate (no ramp)", ""]
    else:
        out = [f"### fan-out: {n} receivers in one room, 32 B, rate doubling per step until loss or p99 > 1 s", ""]
    out.append("| server | zero-loss rate msg/s (per round) | deliveries/s | p50 ms | p99 ms | all reached p99 ms | server CPU µs/delivery | server CPU % | gen CPU % | what ended the ramp, per round |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in servers(d):
        rs = d[s]
        bests, fails = [], []
        for r in sorted(rs):
            b, f = fan_best(rs[r])
            bests.append(b)
            fails.append((f, rs[r].get("error")))
        rates = " / ".join(num(b.get("rate")) if b else "none" for b in bests)
        g = lambda k, sub=None: med([((b.get(k) or {}).get(sub) if sub else b.get(k)) if b else None for b in bests])
        end = " ‖ ".join(f"r{i + 1}: " + (f"error: {e}" if e and not f else why(f)) for i, (f, e) in enumerate(fails))
        gen = g("client_cpu_pct")
        flag = " (gen-limited)" if gen is not None and gen >= GEN_LIMIT_PCT else ""
        if redis:
            cpu = num(med([rs[r].get("all_servers_cpu_us_per_delivery") for r in rs]), 2) + " (3 servers + redis, whole ramp)"
        else:
            cpu = num(g("server_cpu_us_per_delivery"), 2)
        out.append(
            f"| {NAMES.get(s, s)} | {rates} | {num(g('deliveries_per_s'))} | {ms(g('latency', 'p50_us'))} "
            f"| {ms(g('latency', 'p99_us'))} | {ms(g('time_to_all', 'p99_us'))} | {cpu} "
            f"| {num(g('server_cpu_pct'))}{' (A only)' if redis else ''} | {num(gen)}{flag} | {end} |"
        )
    out += ["", "Columns after the rate are medians over rounds at each round's last clean step. Ratios canal / peer within each round at the last clean step:", ""]
    out.append("| canal vs | zero-loss deliveries/s | server CPU per delivery | p99 | at the same rate (per round): server CPU per delivery | p99 |")
    out.append("|---|---|---|---|---|---|")

    def at_best(f):
        return lambda v: (lambda b: f(b) if b else None)(fan_best(v)[0])

    if redis:
        cpu_key = lambda v: v.get("all_servers_cpu_us_per_delivery")  # noqa: E731
    else:
        cpu_key = at_best(lambda b: b.get("server_cpu_us_per_delivery"))
    for s in servers(d):
        if s == "canal" or "canal" not in d:
            continue
        out.append(
            f"| {NAMES.get(s, s)} | {ratio_cell(d['canal'], d[s], at_best(lambda b: b.get('deliveries_per_s')))} "
            f"| {ratio_cell(d['canal'], d[s], cpu_key)} "
            f"| {ratio_cell(d['canal'], d[s], at_best(lambda b: (b.get('latency') or {}).get('p99_us')))} "
            f"| {same_rate_cell(d['canal'], d[s], step_cpu) if not redis else '-'}{saturated_note(d['canal'], d[s]) if not redis else ''} "
            f"| {same_rate_cell(d['canal'], d[s], step_p99) if not redis else '-'} |"
        )
    out += ["", "CPU per delivery falls as the rate rises (more messages per wake and per write) and p99 grows"
            " with it, so the last two columns compare both servers at the highest rate both ran clean in"
            f" that round. Where both were at least {SATURATED_PCT:.0f} % busy there, each one's CPU per"
            " delivery is about its busy share divided by the rate, so that ratio is about the ratio of their"
            " busy shares and says little about their efficiency; latency at the same rate and the zero-loss"
            " rate tell them apart."]
    return out


def saturated_note(ra, rb):
    n, total = both_saturated(ra, rb)
    return f"; both ≥ {SATURATED_PCT:.0f} % busy in {n} of {total} rounds" if n else ""


def same_rate_cell(ra, rb, key):
    rs = [same_rate(ra[r], rb[r], key) for r in sorted(set(ra) & set(rb))]
    rs = [x for x in rs if x]
    if not rs:
        return "-"
    vals = [x[1] for x in rs]
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f}); at " + " / ".join(num(x[0]) for x in rs) + " msg/s"


def idle(d):
    out = ["### idle: chat connections after one message each, 100 rooms", ""]
    out.append("| server | RSS per connection (first→last step) | least-squares slope | connect rate /s | steps: connections @ server RSS | connections dropped | gen RSS last step | error |")
    out.append("|---|---:|---:|---:|---|---:|---:|---|")
    for s in servers(d):
        for r in sorted(d[s]):
            v = d[s][r]
            st = v.get("steps") or []
            steps = ", ".join(f"{x.get('connections', 0):,} @ {x.get('server_rss_kb', 0) / 1024:.0f} MiB" for x in st)
            dropped = sum(x.get("dropped", 0) or 0 for x in st)
            gen_rss = st[-1].get("client_rss_kb") if st else None
            if isinstance(gen_rss, list):
                gen_rss = sum(gen_rss)
            out.append(
                f"| {NAMES.get(s, s)} | {num(v.get('bytes_per_connection_first_last'))} B "
                f"| {num(v.get('bytes_per_connection_least_squares'))} B | {num(v.get('connect_rate_per_s'))} "
                f"| {steps} | {dropped} | {'-' if gen_rss is None else f'{gen_rss / 1024:.0f} MiB'} | {v.get('error') or ''} |"
            )
    return out


def crosscheck(d):
    out = ["### cross-check: echo with an independent client (node `ws`, bench/peers/node/echo-client.js)", ""]
    out.append("| server | round trips/s (per round) | p50 ms | p99 ms | server CPU s (whole run) | errors |")
    out.append("|---|---|---:|---:|---:|---|")
    for s in servers(d):
        vals = [d[s][r] for r in sorted(d[s])]
        out.append(
            f"| {NAMES.get(s, s)} | {' / '.join(num(v.get('round_trips_per_s')) for v in vals)} "
            f"| {num(med([v.get('p50_ms') for v in vals]), 2)} | {num(med([v.get('p99_ms') for v in vals]), 2)} "
            f"| {num(med([v.get('server_cpu_s_whole_run') for v in vals]), 2)} "
            f"| {'; '.join(str(v.get('error')) for v in vals if v.get('error') or v.get('mismatches'))} |"
        )
    if "canal" in d and "uws" in d:
        out += ["", f"canal / uWebSockets.js round trips/s within each round: {ratio_cell(d['canal'], d['uws'], lambda v: v.get('round_trips_per_s'))}"]
    return out


def main():
    d = load(sys.argv[1])
    lines = []
    scenarios = [("echo", echo), ("fanout", fanout), ("idle", idle), ("crosscheck", crosscheck),
                 ("redis", lambda x: fanout(x, redis=True))]
    for name, f in scenarios:
        if name in d:
            lines += f(d[name]) + [""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
