#!/usr/bin/env bash
# Audit the pinned dependencies (pyproject.toml: runtime and dev) for known
# vulnerabilities with pip-audit (pinned below), in a tool venv of its own.
#
#   bash scripts/audit-deps.sh            # OSV (api.osv.dev)
#   bash scripts/audit-deps.sh -s pypi    # PyPI's JSON API instead
#
# --strict: a dependency that could not be audited fails the run, so a
# machine without access to the vulnerability service says so (exit 1)
# instead of reporting "no known vulnerabilities". Needs network access to
# PyPI (to install pip-audit once) and to the service. Not part of test.sh:
# the development machines have neither service (docs/SECURITY.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_AUDIT_VERSION=2.10.1
tool=.tools/pip-audit
if [ ! -x "$tool/bin/pip-audit" ] || ! "$tool/bin/pip-audit" --version | grep -q "$PIP_AUDIT_VERSION"; then
  python3 -m venv "$tool"
  "$tool/bin/pip" install -q "pip-audit==$PIP_AUDIT_VERSION"
fi
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
# Every "name==version" pin of pyproject.toml (runtime and optional groups).
grep -oE '^\s*"[A-Za-z0-9_.-]+==[^"]+"' pyproject.toml | tr -d ' "' > "$pins"
echo "auditing $(wc -l < "$pins") pinned dependencies"
service=(-s osv)
[ $# -gt 0 ] && service=("$@")
"$tool/bin/pip-audit" --strict --no-deps --disable-pip -r "$pins" "${service[@]}"
