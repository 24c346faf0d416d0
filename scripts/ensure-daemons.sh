#!/usr/bin/env bash
# Make libvirt usable: virtlogd + libvirtd running (started by hand when no
# service manager runs them), and /dev/kvm usable by the kvm group (otherwise
# libvirt re-probes QEMU at every domain start, ~50 s each). Idempotent.
set -euo pipefail
restart=0
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
  if [ "$(stat -c %G /dev/kvm)" != kvm ] || [ $(( 0$(stat -c %a /dev/kvm) & 060 )) -ne $(( 060 )) ]; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
    echo "ensure-daemons: /dev/kvm is now group kvm, mode 660"
    restart=1
  fi
fi
# libvirt's network driver keeps per-network files here even with its DNS
# and DHCP off (NAT_FILTERED networks); packages create it, bare installs may not.
mkdir -p /var/lib/libvirt/dnsmasq
if [ -d /run/systemd/system ]; then
  systemctl start virtlogd.socket libvirtd.socket libvirtd.service 2>/dev/null || systemctl start libvirtd
  [ "$restart" = 1 ] && systemctl restart libvirtd
else
  if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
  if [ "$restart" = 1 ] && pgrep -x libvirtd >/dev/null; then
    pkill -x libvirtd; for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
  fi
  if ! pgrep -x libvirtd >/dev/null; then libvirtd -d; fi
fi
for _ in $(seq 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "ensure-daemons: libvirtd does not answer on qemu:///system" >&2
exit 1
