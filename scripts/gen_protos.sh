#!/usr/bin/env bash
# Generate Python code (+ mypy stubs) for protos/agentvm/v1 into services/agentvm/v1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=$root/services
rm -rf "$out/agentvm/v1"
mkdir -p "$out/agentvm/v1"
"$py" -m grpc_tools.protoc -I "$root/protos" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  "$root"/protos/agentvm/v1/*.proto
touch "$out/agentvm/v1/__init__.py" "$out/agentvm/v1/py.typed"
