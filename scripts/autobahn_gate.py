#!/usr/bin/env python3
"""Gate on an Autobahn|Testsuite report directory (index.json format).

    scripts/autobahn_gate.py REPORT_DIR

A case passes when its `behavior` is OK, NON-STRICT or INFORMATIONAL and, where
the report has it, its `behaviorClose` is one of those too. Anything else
(FAILED, WRONG CODE, UNCLEAN, UNIMPLEMENTED, ERROR, missing, ...) fails.

Prints the counts by verdict, each failing case with the detail from its
per-case report, and last the line `autobahn: N passed, M failed`.
Exits 1 if any case failed or the report holds no case, 2 on a bad report.
"""

from __future__ import annotations

import html
import json
import re
import sys
from collections import Counter
from pathlib import Path

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
DETAIL_CHARS = 300


def case_key(case_id: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]


def short(value: object, limit: int = DETAIL_CHARS) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(text: str) -> str:
    """Autobahn descriptions carry a little HTML (<b>, <br>)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", text or ""))


def load_case_report(report_dir: Path, entry: dict) -> dict | None:
    name = entry.get("reportfile")
    if not name:
        return None
    try:
        return json.loads((report_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_failure(case_id: str, agent: str, entry: dict, report: dict | None) -> list[str]:
    behavior = entry.get("behavior", "MISSING")
    close = entry.get("behaviorClose", "-")
    lines = [f"FAIL {case_id} [{agent}]: behavior={behavior} behaviorClose={close}"]
    if report is None:
        lines.append("    (no per-case report)")
        return lines
    for label, key in (("description", "description"), ("expectation", "expectation")):
        if report.get(key):
            lines.append(f"    {label}: {short(plain(report[key]))}")
    if "expected" in report:
        lines.append(f"    expected: {short(report['expected'])}")
    if "received" in report:
        lines.append(f"    received: {short(report['received'])}")
    if report.get("result"):
        lines.append(f"    result: {short(report['result'])}")
    if report.get("resultClose"):
        lines.append(f"    resultClose: {short(report['resultClose'])}")
    if "expectedClose" in report:
        lines.append(f"    expectedClose: {short(report['expectedClose'])}")
    close_bits = [
        f"{k}={report[k]!r}"
        for k in (
            "remoteCloseCode",
            "remoteCloseReason",
            "localCloseCode",
            "wasClean",
            "wasNotCleanReason",
            "closedByMe",
            "droppedByMe",
        )
        if k in report
    ]
    if close_bits:
        lines.append("    close: " + ", ".join(close_bits))
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in {"-h", "--help"}:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    report_dir = Path(argv[1])
    index_path = report_dir / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"autobahn_gate: cannot read {index_path}: {err}", file=sys.stderr)
        return 2
    if not isinstance(index, dict):
        print(f"autobahn_gate: {index_path}: not an agent -> cases object", file=sys.stderr)
        return 2

    by_behavior: Counter[str] = Counter()
    by_close: Counter[str] = Counter()
    passed = 0
    failures: list[tuple[str, str, dict]] = []
    for agent, cases in index.items():
        if not isinstance(cases, dict):
            continue
        for case_id in sorted(cases, key=case_key):
            entry = cases[case_id] if isinstance(cases[case_id], dict) else {}
            behavior = entry.get("behavior", "MISSING")
            by_behavior[behavior] += 1
            ok = behavior in PASSING
            if "behaviorClose" in entry:
                by_close[entry["behaviorClose"]] += 1
                ok = ok and entry["behaviorClose"] in PASSING
            if ok:
                passed += 1
            else:
                failures.append((case_id, agent, entry))

    def fmt(counter: Counter[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    print(f"behavior: {fmt(by_behavior) or 'none'}")
    if by_close:
        print(f"behaviorClose: {fmt(by_close)}")
    for case_id, agent, entry in failures:
        for line in describe_failure(case_id, agent, entry, load_case_report(report_dir, entry)):
            print(line)
    if failures:
        print("failing cases: " + " ".join(
            f"{cid}({e.get('behavior', 'MISSING')}/{e.get('behaviorClose', '-')})" for cid, _, e in failures
        ))
    total = passed + len(failures)
    if total == 0:
        print(f"autobahn_gate: {index_path} holds no case", file=sys.stderr)
    print(f"autobahn: {passed} passed, {len(failures)} failed")
    return 1 if failures or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
