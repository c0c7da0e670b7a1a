#!/usr/bin/env bash
# The whole test suite:
#   1. `cargo fmt --check`, `cargo clippy -D warnings` and the API docs built with warnings as
#      errors (private items too, so no doc link rots);
#   2. the Python venv for the channels_redis interop tests (~/.cache/canal/py-venv);
#   3. `cargo test` (unit, integration over real sockets, real redis-server processes started
#      per test, real Python channels_redis, doc tests, example builds);
#   4. the chat page end to end in headless Chromium (scripts/browser-test.sh; playwright-core
#      is installed with npm ci into tests/browser/node_modules);
#   5. a smoke run of the benchmark (canal only, a few seconds), so the suite keeps working;
#   6. the Autobahn|Testsuite cases 1-10 against `canal serve`'s echo endpoint.
#
# Needs cargo with rustfmt and clippy, python3 with venv, redis-server, node 18+ with npm, and
# chromium. Outside CI a missing outside part is reported loudly and its tests skip; under
# CI=true they fail instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ci() { [[ "${CI:-}" == "true" ]]; }
warn() { printf '\n*** test.sh: %s ***\n\n' "$*" >&2; }

echo "== format, lints and API docs"
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    cargo fmt --all --check
    cargo clippy --all-targets --workspace -q -- -D warnings
else
    ci && { echo "test.sh: rustfmt and clippy are required under CI" >&2; exit 1; }
    warn "rustfmt or clippy is missing (rustup component add rustfmt clippy): format and lint checks SKIP"
fi
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items -q

PY_VENV="${CANAL_PY_VENV:-$HOME/.cache/canal/py-venv}"
REQS="tests/python/requirements.txt"

echo "== Python venv for the interop tests ($PY_VENV)"
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ ! -x "$PY_VENV/bin/python" ]]; then
        python3 -m venv "$PY_VENV"
    fi
    stamp="$PY_VENV/.canal-requirements"
    if ! cmp -s "$REQS" "$stamp" 2>/dev/null; then
        "$PY_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
        cp "$REQS" "$stamp"
    fi
    export CANAL_PYTHON="$PY_VENV/bin/python"
else
    ci && { echo "test.sh: python3 with venv is required under CI" >&2; exit 1; }
    warn "python3 with venv/ensurepip is missing: the Python interop tests and Autobahn will SKIP"
fi
command -v redis-server >/dev/null || {
    ci && { echo "test.sh: redis-server is required under CI" >&2; exit 1; }
    warn "redis-server is missing: the Redis layer tests will SKIP"
}

echo "== cargo test"
cargo test --all-targets
cargo test --doc

echo "== browser tests (headless Chromium)"
bash scripts/browser-test.sh

echo "== benchmark smoke run (canal only, seconds; the full comparison is scripts/bench.sh)"
bash scripts/bench.sh --quick --servers canal --scenarios echo,fanout --rounds 1

echo "== Autobahn|Testsuite cases 1-10"
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
    bash scripts/autobahn.sh
else
    warn "SKIPPED the Autobahn suite: python3 with venv/ensurepip is missing"
fi
