#!/usr/bin/env bash
# Regenerate centripy/proxy/proxy_pb2.py and proxy_pb2.pyi from proxy.proto (the GRPC event
# proxy's messages). Same rules as scripts/gen_proto.sh: grpcio-tools is a development tool
# only (PY may name another interpreter that has it, e.g. PY=/tmp/tools/bin/python), the
# generated files are committed, and the bundled protoc must not be newer than the protobuf
# runtime pinned in setup.cfg. The service itself needs no generated stub: centripy.proxy.grpc
# calls it through generic unary-unary calls.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PY:-.venv/bin/python}"
OUT=centripy/proxy

"$PY" -c 'import grpc_tools' 2>/dev/null \
  || { echo "gen_proxy_proto.sh: grpcio-tools missing: $PY -m pip install grpcio-tools" >&2; exit 1; }

"$PY" -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. "$OUT/proxy.proto"

prepend() {
  local file="$1" header="$2" tmp
  tmp="$(mktemp)"
  printf '%s\n' "$header" | cat - "$file" >"$tmp"
  mv "$tmp" "$file"
}
prepend "$OUT/proxy_pb2.py" "# ruff: noqa
# mypy: ignore-errors"
prepend "$OUT/proxy_pb2.pyi" "# ruff: noqa
# mypy: ignore-errors"
.venv/bin/ruff format --quiet "$OUT/proxy_pb2.py" "$OUT/proxy_pb2.pyi"
echo "gen_proxy_proto.sh: generated with $("$PY" -m grpc_tools.protoc --version)" >&2
