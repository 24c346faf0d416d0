"""Shared code of every agent-vm service: settings, errors, logging, gRPC bootstrap."""
