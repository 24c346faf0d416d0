"""Unit tests: fast, no VMs, no system libvirtd (a package so tests import .helpers)."""
