"""Bounds every service and the CLI apply to a VM's resources (vm-manager enforces them)."""

from __future__ import annotations

MAX_VCPUS = 16
MAX_MEMORY_MIB = 64 * 1024
MAX_DISK_MIB = 256 * 1024
