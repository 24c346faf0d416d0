"""A tiny "agent": inspects the machine it runs on and does some work."""

import hashlib
import os
import platform

print(f"hello from {platform.node()} running Linux {os.uname().release}")
print(f"python {platform.python_version()}, {os.cpu_count()} vCPU(s), pid {os.getpid()}")
digest = hashlib.sha256(b"agent-vm" * 100_000).hexdigest()
print(f"sha256 of 800 kB of work: {digest[:16]}...")
with open("/etc/os-release") as fh:
    print(next(line for line in fh if line.startswith("PRETTY_NAME")).strip())
