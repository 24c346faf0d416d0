#!/usr/bin/env bash
# agent-vm setup: installs everything (Debian packages, libvirt daemons, the
# .venv, generated code, buf, the guest image), starts the services and runs
# an example agent inside a fresh VM. Idempotent: run it again any time.
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)
if [ "$(id -u)" != 0 ]; then exec sudo -E "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
step() { printf '\n==> %s\n' "$*"; }

step "Debian packages"
pkgs=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86 qemu-utils
      mmdebstrap libxml2-utils e2fsprogs busybox-static python3-venv python3-dev gcc
      nftables iptables ebtables conntrack iproute2 dnsmasq-base umoci skopeo)
command -v npm >/dev/null || pkgs+=(npm)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
# python3-venv/python3-dev are only needed when python3 is Debian's own.
if [ "$(command -v python3)" != /usr/bin/python3 ]; then
  missing=("${missing[@]/python3-venv}"); missing=("${missing[@]/python3-dev}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi

step "libvirt daemons"
bash scripts/ensure-daemons.sh
virsh -c qemu:///system version

step "Python environment (.venv)"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  python3 -c 'import sys; assert sys.version_info >= (3, 11), "agent-vm needs Python >= 3.11"'
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
else
  echo "up to date"
fi

step "generated gRPC code"
bash scripts/gen_protos.sh >/dev/null
echo "services/agentvm/v1 generated from protos/"

step "buf (protobuf lint and breaking-change checks)"
if [ ! -x .tools/node_modules/.bin/buf ]; then
  npm install --silent --prefix .tools @bufbuild/buf@1.75.0
fi
# Next to agent-vm in .venv/bin, where the README's `.venv/bin/buf curl` finds it.
ln -sfn ../../.tools/node_modules/.bin/buf .venv/bin/buf
.venv/bin/buf --version

step "services"
.venv/bin/agent-vm down >/dev/null
.venv/bin/agent-vm up

step "guest image"
.venv/bin/agent-vm image build

step "doctor"
.venv/bin/agent-vm doctor

step "the main job: examples/hello_agent.py in a fresh VM (agent-vm run)"
.venv/bin/agent-vm run examples/hello_agent.py </dev/null  # run passes a piped stdin on
