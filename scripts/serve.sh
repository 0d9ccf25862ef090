#!/usr/bin/env bash
# Start centripy with the example configuration (port 8000). Extra arguments are passed to
# `centripy serve`, e.g. `./scripts/serve.sh --port 9000`. The SQLite event log file is
# created in the current working directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/centripy" serve --config "$ROOT/examples/config.json" "$@"
