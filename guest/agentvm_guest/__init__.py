"""agent-vm guest agent: the gRPC service inside each VM (stdlib + grpcio + protobuf)."""

import os

# The agent forks its programs with a preexec_fn (confine.py) while gRPC
# threads run: gRPC's fork handlers must stay out of that child (with them it
# crashes). Read by grpc when it is first imported, so set before that.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
