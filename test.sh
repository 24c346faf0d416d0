#!/usr/bin/env bash
# The whole test suite: lint, types, contracts, unit + real-VM tests with coverage.
# Needs ./setup.sh to have run once. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then exec sudo -E "$0" "$@"; fi
bash scripts/ensure-daemons.sh
[ -e services/agentvm/v1/vm_manager_pb2.py ] || bash scripts/gen_protos.sh >/dev/null
buf=.tools/node_modules/.bin/buf

# (One command per line: under set -e a failure on the left of && would not stop the run.)
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy --strict"; .venv/bin/mypy
echo "==> bandit (no high-severity findings)"
.venv/bin/bandit -q -r services guest clients -x services/agentvm/v1 --severity-level high
echo "==> buf lint"; "$buf" lint
echo "==> buf breaking (against main)"
if git rev-parse --verify -q main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then
  "$buf" breaking --against '.git#branch=main'
else
  echo "no main branch with protos to compare against"
fi
echo "==> API reference (docs/api: every proto element and client name documented)"
bash scripts/api-docs.sh
echo "==> pytest (unit, integration with real VMs, e2e) with coverage"
set +e
.venv/bin/pytest --cov --cov-report=term-missing:skip-covered --cov-report=xml "$@"
rc=$?
set -e
# Nothing of ours may be left behind.
left=$(virsh -c qemu:///system list --all --name | grep -c '^agent-vm-test' || true)
if [ "$left" != 0 ]; then echo "LEAK: $left test domain(s) left in libvirt"; rc=1; fi
nets=$(virsh -c qemu:///system net-list --all --name | grep -c '^agent-vm-test' || true)
if [ "$nets" != 0 ]; then echo "LEAK: $nets test libvirt network(s) left"; rc=1; fi
links=$(ip -br link | grep -cE '^(avmb-|avmw-)' || true)
if [ "$links" != 0 ]; then echo "LEAK: $links test bridge/veth interface(s) left"; rc=1; fi
worlds=$(ip netns list | grep -c '^avm' || true)
if [ "$worlds" != 0 ]; then echo "LEAK: $worlds test network namespace(s) left"; rc=1; fi
mounts=$(grep -c ' /var/lib/agent-vm-tests/' /proc/self/mountinfo || true)
if [ "$mounts" != 0 ]; then echo "LEAK: $mounts test workspace mount(s) left"; rc=1; fi
loops=$(losetup -a 2>/dev/null | grep -c 'agent-vm-tests' || true)
if [ "$loops" != 0 ]; then echo "LEAK: $loops test loop device(s) left"; rc=1; fi
exit $rc
