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

# E2B's envd protocol (protos/e2b, wire names kept) for the e2b-gateway:
# google protobuf messages + Connect server stubs (connectrpc).
envd_out=$out/agentvm/e2b_gateway/envd
rm -rf "$envd_out"
mkdir -p "$envd_out"
"$py" -m grpc_tools.protoc -I "$root/protos/e2b/envd" \
  --python_out="$envd_out" --mypy_out="$envd_out" \
  --connectrpc_out="$envd_out" --connectrpc_opt=protobuf=google \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-connectrpc="$(dirname "$py")/protoc-gen-connectrpc" \
  "$root"/protos/e2b/envd/process/process.proto "$root"/protos/e2b/envd/filesystem/filesystem.proto
touch "$envd_out/__init__.py" "$envd_out/py.typed" "$envd_out/process/__init__.py" "$envd_out/filesystem/__init__.py"
