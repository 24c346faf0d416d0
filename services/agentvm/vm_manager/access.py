"""Who may use which VM: warm pool VMs are the pool's alone until they are leased.

A VM that pool-manager creates (labels ``agent-vm/owner=pool-manager`` and
``agent-vm/pool=KEY``) waits warm in its pool until ``AcquireVM`` hands it out. Until
then anything planted in it (a file, a process, a changed network policy) would reach
the next tenant, so vm-manager keeps every other caller away from it:

* its agent relay listens on a socket whose name is random (``agent-<hex>.sock``, kept
  in the domain's metadata), not the usual ``agent.sock``, and its ``agent_endpoint`` is
  shown to pool-manager only (its health checks dial it); every other caller sees an
  empty endpoint and the VM's ``pool`` mark (``vm list`` shows it);
* the RPCs that change it or reach its guest (StartVM, StopVM, UpdateNetworkPolicy,
  snapshots) are refused with FAILED_PRECONDITION; DestroyVM and CaptureEvidence stay
  open (they end the VM: the monitor's responses, an operator's clean-up);
* ``LeasePoolVM`` (pool-manager's certificate only) records the lessee in the labels
  ``agent-vm/pool-lessee`` and ``agent-vm/pool-lease``, and adds the lessee's labels
  (the executor's ``agent-vm/executor`` and ``agent-vm/sandbox``: how it finds its
  sandboxes' VMs after a restart); from then on the VM is used like any VM, at the
  same socket. Release destroys it.

Callers are named by :func:`agentvm.common.identity.caller` (the verified certificate
under mutual TLS). Root on the host can still open the relay socket directly: root is
outside the threat model (docs/SECURITY.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from agentvm.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from agentvm.v1 import common_pb2
from agentvm.vm_manager.vm import VM

OWNER_LABEL = "agent-vm/owner"
POOL_OWNER = "pool-manager"
POOL_LABEL = "agent-vm/pool"
LESSEE_LABEL = "agent-vm/pool-lessee"
LEASE_LABEL = "agent-vm/pool-lease"
# Only LeasePoolVM sets these.
RESERVED_LABELS = (LESSEE_LABEL, LEASE_LABEL)
POOL_MANAGER = "pool-manager"
DEFAULT_SOCKET = "agent.sock"


def is_pool_vm(labels: Mapping[str, str]) -> bool:
    return labels.get(OWNER_LABEL) == POOL_OWNER


def is_warm(vm: VM) -> bool:
    """A pool VM that has not been leased: the pool's alone."""
    return is_pool_vm(vm.labels) and not vm.labels.get(LESSEE_LABEL)


def pool_key(vm: VM) -> str:
    return vm.labels.get(POOL_LABEL) or (
        f"{vm.profile.name}/{vm.network_mode.name}".lower().replace("_", "-")
    )


def socket_name(labels: Mapping[str, str]) -> str:
    """The relay socket's file name for a new VM: random for pool VMs."""
    if is_pool_vm(labels):
        # Short: a Unix socket path has at most 107 bytes.
        return f"agent-{secrets.token_hex(6)}.sock"
    return DEFAULT_SOCKET


def check_create(labels: Mapping[str, str], who: str) -> None:
    """Only pool-manager makes pool VMs; nobody sets the lease labels at create."""
    for key in RESERVED_LABELS:
        if key in labels:
            raise InvalidArgument(
                f"label {key} is reserved: vm-manager sets it when pool-manager leases a "
                "pool VM; leave it out"
            )
    if is_pool_vm(labels) and who != POOL_MANAGER:
        raise PermissionDenied(
            f"label {OWNER_LABEL}={POOL_OWNER} marks a pool VM, which only pool-manager "
            f"creates (caller: {who or 'unnamed'}); take a VM from a pool with AcquireVM "
            "(agent-vm pool ...) or create one without that label"
        )


def refusal(vm: VM) -> str:
    return (
        f"VM {vm.name} is a warm pool VM of pool {pool_key(vm)} and is not leased: acquire it "
        "from the pool (pool-manager's AcquireVM; `agent-vm pool status` shows the pools) "
        "before using it, or destroy it"
    )


def require_usable(vm: VM, who: str, what: str) -> None:
    """FAILED_PRECONDITION when ``who`` may not ``what`` the VM (a warm pool VM)."""
    if is_warm(vm) and who != POOL_MANAGER:
        raise FailedPrecondition(f"cannot {what}: {refusal(vm)}")


def membership(vm: VM) -> common_pb2.PoolMembership | None:
    if not is_pool_vm(vm.labels):
        return None
    lessee = vm.labels.get(LESSEE_LABEL, "")
    return common_pb2.PoolMembership(
        pool=pool_key(vm),
        state=common_pb2.POOL_VM_STATE_LEASED if lessee else common_pb2.POOL_VM_STATE_WARM,
        lessee=lessee,
    )


def view(vm: VM, who: str) -> common_pb2.VM:
    """``vm`` as ``who`` may see it: a warm pool VM's endpoint for pool-manager only."""
    msg = vm.to_proto()
    pool = membership(vm)
    if pool is not None:
        msg.pool.CopyFrom(pool)
        if pool.state == common_pb2.POOL_VM_STATE_WARM and who != POOL_MANAGER:
            msg.agent_endpoint = ""
    return msg


def check_lease(vm: VM, who: str, lessee: str, labels: Mapping[str, str] | None = None) -> None:
    """LeasePoolVM: pool-manager only, of a pool VM, to a named lessee, with labels
    that leave the pool's own alone."""
    for key in sorted(labels or {}):
        if key in (OWNER_LABEL, POOL_LABEL, *RESERVED_LABELS):
            raise InvalidArgument(
                f"label {key} is the pool's own: a lease cannot set it; leave it out of "
                "the lessee's labels"
            )
    if who != POOL_MANAGER:
        raise PermissionDenied(
            f"only pool-manager leases pool VMs (caller: {who or 'unnamed'}): use "
            "pool-manager's AcquireVM"
        )
    if not is_pool_vm(vm.labels):
        raise FailedPrecondition(f"VM {vm.name} is not a pool VM: there is nothing to lease")
    held = vm.labels.get(LESSEE_LABEL, "")
    if held and held != lessee:
        raise FailedPrecondition(f"VM {vm.name} is leased to {held} already")


def adopted_socket_name(recorded: str) -> str:
    """The socket name a VM's metadata recorded (VMs made before it was: agent.sock)."""
    if recorded == DEFAULT_SOCKET or (
        recorded.startswith("agent-")
        and recorded.endswith(".sock")
        and recorded[6:-5].isalnum()
        and len(recorded) <= 64
    ):
        return recorded
    return DEFAULT_SOCKET
