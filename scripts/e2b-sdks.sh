#!/usr/bin/env bash
# The unchanged E2B SDKs the tests drive agent-vm with, each where its own
# dependencies cannot clash with ours, all pinned. Idempotent.
#   .tools/e2b-sdk-2.63.0/   e2b 2.63.0 + e2b-code-interpreter 2.11.5 (Python venv)
#   .tools/e2b-sdk-2.45.1/   e2b 2.45.1 (still widely used; the interpreter needs >= 2.55.1)
#   .tools/e2b-js/           npm e2b 2.51.0 (tests/e2b/js/package*.json)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

python_sdk() {
  local venv=$root/.tools/e2b-sdk-$1; shift
  local stamp; stamp=$venv/.installed-$(echo "$*" | sha256sum | cut -c1-12)
  [ -e "$stamp" ] && return 0
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$@"
  touch "$stamp"
}

python_sdk 2.63.0 e2b==2.63.0 e2b-code-interpreter==2.11.5
python_sdk 2.45.1 e2b==2.45.1

js=$root/.tools/e2b-js
stamp=$js/.installed-$(cat "$root"/tests/e2b/js/package*.json | sha256sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
  rm -rf "$js"; mkdir -p "$js"
  cp "$root"/tests/e2b/js/package.json "$root"/tests/e2b/js/package-lock.json "$js/"
  # The lock file pins every package the SDK pulls in.
  (cd "$js" && npm ci --silent --no-audit --no-fund)
  touch "$stamp"
fi
# ESM resolves packages next to the importing file: the scenario runs from there.
cp "$root/tests/e2b/js/scenario.mjs" "$js/"
