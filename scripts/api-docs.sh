#!/usr/bin/env bash
# The API reference, from the code's own documentation, into docs/api/:
#   docs/api/grpc.md      every service, method, message, field and enum of protos/
#   docs/api/python/      the Python client (agent_vm), rendered by pdoc
# Fails naming what is undocumented (a proto element without a comment, a
# public client name without a docstring). Run by test.sh. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/api
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.tools/node_modules/.bin/buf build -o "$tmp/protos.binpb"
.venv/bin/python scripts/api_docs.py "$tmp/protos.binpb" "$out/grpc.md"
.venv/bin/python scripts/api_docs_python.py
rm -rf "$out/python"
.venv/bin/pdoc --docformat markdown --no-show-source -o "$out/python" agent_vm 2>"$tmp/pdoc.err"
if grep -q . "$tmp/pdoc.err"; then
  cat "$tmp/pdoc.err" >&2
  echo "pdoc warned about the client (above): fix its docstrings or annotations" >&2
  exit 1
fi
echo "wrote $out/python/ (pdoc)"
