import os

# Like the guest agent (agentvm_guest/__init__.py): the agent run in-process
# by unit tests forks with a preexec_fn beside gRPC threads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
