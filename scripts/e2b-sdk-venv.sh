#!/usr/bin/env bash
# The unchanged E2B Python SDK in its own venv (its pins clash with ours):
# .tools/e2b-sdk-VERSION/. Idempotent. Usage: scripts/e2b-sdk-venv.sh [VERSION]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-2.63.0}
venv=$root/.tools/e2b-sdk-$version
pkgs=("e2b==$version")
# e2b-code-interpreter 2.11.5 needs e2b >= 2.55.1.
[ "$version" = 2.63.0 ] && pkgs+=("e2b-code-interpreter==2.11.5")
stamp=$venv/.installed-$(echo "${pkgs[*]}" | sha256sum | cut -c1-12)
[ -e "$stamp" ] && exit 0
python3 -m venv "$venv"
"$venv/bin/pip" install -q "${pkgs[@]}"
touch "$stamp"
