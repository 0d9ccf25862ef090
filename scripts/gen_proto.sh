#!/usr/bin/env bash
# Regenerate engine/protocol/client_pb2.py and client_pb2.pyi from client.proto.
#
# Needs grpcio-tools in .venv (`.venv/bin/pip install grpcio-tools`); it is a development
# tool only: the generated files are committed and the server needs just `protobuf` at run
# time. The generated code requires a protobuf runtime at least as new as the protoc that
# grpcio-tools bundles (same major version), so keep the protobuf pin in setup.cfg in step.
#
# The files are compiled from the repository root so that the descriptor is registered as
# "engine/protocol/client.proto" and cannot clash with another "client.proto" (such as the
# one centrifuge-python ships) in the same process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY=.venv/bin/python
OUT=engine/protocol

"$PY" -c 'import grpc_tools' 2>/dev/null \
  || { echo "gen_proto.sh: grpcio-tools missing: .venv/bin/pip install grpcio-tools" >&2; exit 1; }

"$PY" -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. "$OUT/client.proto"

# Generated code is neither linted nor type-checked: mypy reads the .pyi instead of the .py,
# and takes its types without checking it (google.protobuf has no stubs installed here).
prepend() {
  local file="$1" header="$2" tmp
  tmp="$(mktemp)"
  printf '%s\n' "$header" | cat - "$file" >"$tmp"
  mv "$tmp" "$file"
}
prepend "$OUT/client_pb2.py" "# ruff: noqa
# mypy: ignore-errors"
prepend "$OUT/client_pb2.pyi" "# ruff: noqa
# mypy: ignore-errors"

# The module is imported as centripy.engine.protocol.client_pb2 (the package namespace).
sed -i 's/"engine\.protocol\.client_pb2"/"centripy.engine.protocol.client_pb2"/' "$OUT/client_pb2.py"
.venv/bin/ruff format --quiet "$OUT/client_pb2.py" "$OUT/client_pb2.pyi"
echo "gen_proto.sh: generated with $("$PY" -m grpc_tools.protoc --version)" >&2
