#!/usr/bin/env bash
# Run every check CI runs: lint, format, types, the documentation site build (mkdocs --strict),
# then the whole test suite (unit and integration tests with the real SDKs). Extra arguments go
# to pytest, e.g.
# `./scripts/test.sh -k recovery`. Every step runs; the script fails if any step failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh

failed=()

step() {
  local name="$1"
  shift
  echo "==> $name" >&2
  if ! "$@"; then
    failed+=("$name")
  fi
}

run_pytest() {
  local rc=0
  # Files run in parallel on CENTRIPY_TEST_WORKERS processes (default 3: the integration tests
  # mostly wait on servers they started); one file's tests stay on one worker (--dist loadfile).
  .venv/bin/python -m pytest -q --timeout 120 -n "${CENTRIPY_TEST_WORKERS:-3}" --dist loadfile "$@" \
    || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    return 1
  fi
  return "$rc"
}

# The documentation site (mkdocs.yml): --strict fails on a broken link or a missing included file.
build_docs() {
  local site rc=0
  site="$(mktemp -d)"
  NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site" || rc=$?
  rm -rf "$site"
  return "$rc"
}

step "ruff check" .venv/bin/ruff check .
step "ruff format --check" .venv/bin/ruff format --check .
step "mypy" .venv/bin/mypy -p centripy
step "mkdocs build --strict" build_docs
step "pytest" run_pytest "$@"

if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED: $(IFS=,; echo "${failed[*]}")" >&2
  exit 1
fi
echo "all checks passed" >&2
