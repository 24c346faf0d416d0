"""agent-vm guest agent: the gRPC service inside each VM (stdlib + grpcio + protobuf)."""

__version__ = "0.1.0"
