#!/usr/bin/env bash
# The whole test suite: unit, integration, doc and example builds (`cargo test`), the chat
# page end to end in headless Chromium (scripts/browser-test.sh), then the Autobahn|Testsuite
# cases 1-10 against `canal serve`'s echo endpoint.
#
# Needs: cargo, node 18+ with npm and chromium (browser tests; playwright-core is installed
# with npm ci into tests/browser/node_modules), python3 (with venv/pip, for the Autobahn
# driver, installed on first run into ~/.cache/canal). Outside CI a missing outside part is
# reported loudly and skipped; under CI=true it fails instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ci() { [[ "${CI:-}" == "true" ]]; }

echo "== cargo test"
cargo test --all-targets
cargo test --doc

echo "== browser tests (headless Chromium)"
bash scripts/browser-test.sh

echo "== Autobahn|Testsuite cases 1-10"
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
    bash scripts/autobahn.sh
else
    if ci; then
        echo "test.sh: python3 with venv is required for the Autobahn suite" >&2
        exit 1
    fi
    echo "test.sh: SKIPPED the Autobahn suite: python3 with venv/ensurepip is missing" >&2
fi
