#!/usr/bin/env bash
# End-to-end tests of the chat page in headless Chromium: tests/browser/chat.test.mjs, run with
# node's test runner. It starts `canal serve` itself (debug build) on a free loopback port and
# drives Debian's chromium through playwright-core (installed with `npm ci` from
# tests/browser/package-lock.json; no browser download). Screenshots land in
# tests/browser/artifacts/ (git-ignored).
#
# Needs: node (18+) with npm, chromium (`apt-get install chromium`; or set CHROMIUM=/path).
# Outside CI a missing part is reported loudly and the tests are skipped; under CI=true it fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ci() { [[ "${CI:-}" == "true" ]]; }
missing() {
    if ci; then
        echo "browser-test.sh: $1 is required for the browser tests (CI=true)" >&2
        exit 1
    fi
    echo "browser-test.sh: SKIPPED the browser tests: $1 is missing" >&2
    exit 0
}

export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
command -v node >/dev/null || missing "node"
command -v npm >/dev/null || missing "npm"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' \
    || missing "node 18 or newer (found $(node --version))"
[[ -x "$CHROMIUM" ]] || missing "chromium ($CHROMIUM; apt-get install chromium)"

if [[ ! -f tests/browser/node_modules/playwright-core/package.json ]] \
    || [[ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]]; then
    echo "== npm ci (tests/browser)"
    (cd tests/browser && npm ci --no-audit --no-fund)
fi

echo "== cargo build (canal)"
cargo build --bin canal
export CANAL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/canal"

echo "== browser tests ($("$CHROMIUM" --version 2>/dev/null || echo chromium))"
cd tests/browser
node --test --test-concurrency=1 chat.test.mjs
