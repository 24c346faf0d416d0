"""agent-vm host services; generated protobuf code lives in agentvm.v1."""
