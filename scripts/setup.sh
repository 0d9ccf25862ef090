#!/usr/bin/env bash
# Prepare a checkout for serving and testing: a Python virtualenv in .venv with the project
# installed in editable mode (plus the `test` extra), and the npm packages of tests/js.
#
# Idempotent: each part is redone only when its inputs changed (a stamp file remembers the
# hash of setup.cfg + pyproject.toml and of tests/js/package*.json), so running it before
# every serve/test costs nothing. Quiet on success, loud on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fail() {
  echo "setup.sh: $*" >&2
  exit 1
}

# Run a command with its output kept in a log; show the log only if the command fails.
quietly() {
  local log
  log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

hash_files() {
  cat "$@" | sha256sum | cut -d' ' -f1
}

# --- Python ------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (Python >= 3.11 is required)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$PYTHON is $("$PYTHON" --version 2>&1); Python >= 3.11 is required"
  echo "setup.sh: creating .venv with $("$PYTHON" --version 2>&1)" >&2
  "$PYTHON" -m venv .venv || fail "could not create .venv (on Debian: apt-get install python3-venv)"
fi

py_stamp=.venv/.centripy-setup.stamp
py_hash="$(hash_files setup.cfg pyproject.toml)"
if [ ! -f "$py_stamp" ] || [ "$(cat "$py_stamp")" != "$py_hash" ] \
  || [ ! -x .venv/bin/centripy ]; then
  echo "setup.sh: installing the project and its test dependencies into .venv" >&2
  quietly .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]' \
    || fail "pip install -e '.[test]' failed"
  echo "$py_hash" >"$py_stamp"
fi

# --- Chromium (tests/integration/test_browser_chat.py drives Debian's, headless) ----------
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: installing chromium with apt-get (for the browser test)" >&2
    if ! { quietly apt-get update && quietly env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y chromium; }; then
      [ "${CI:-}" = "true" ] && fail "apt-get install chromium failed"
      echo "setup.sh: could not install chromium; the browser test will be skipped" >&2
    fi
  elif [ "${CI:-}" = "true" ]; then
    fail "/usr/bin/chromium is missing (install Debian's chromium package as root)"
  fi
fi

# --- Node (centrifuge-js for the integration tests) ---------------------------------------
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ]; then
    fail "node/npm not found: the centrifuge-js tests need Node.js 20 and npm"
  fi
  echo "setup.sh: node/npm not found; the centrifuge-js tests will be skipped" >&2
  exit 0
fi

js_dir=tests/js
js_stamp="$js_dir/node_modules/.centripy-setup.stamp"
if [ -f "$js_dir/package-lock.json" ]; then
  js_hash="$(hash_files "$js_dir/package.json" "$js_dir/package-lock.json")"
else
  js_hash="$(hash_files "$js_dir/package.json")"
fi
if [ ! -f "$js_stamp" ] || [ "$(cat "$js_stamp")" != "$js_hash" ]; then
  echo "setup.sh: installing the npm packages of $js_dir" >&2
  npm_flags=(--no-audit --no-fund --ignore-scripts --loglevel=error)
  if [ -f "$js_dir/package-lock.json" ]; then
    (cd "$js_dir" && quietly npm ci "${npm_flags[@]}") || fail "npm ci in $js_dir failed"
  else
    (cd "$js_dir" && quietly npm install "${npm_flags[@]}") || fail "npm install in $js_dir failed"
  fi
  echo "$js_hash" >"$js_stamp"
fi
