"""Sandbox records kept with their VMs (docs/SCALE_OUT.md, "Executor replicas").

A sandbox's record (journal.Record: spec, lifetime, pause state, default
environment) lives in its VM's metadata on its node, sealed
(record_seal.py), written with vm-manager's compare-and-set
``SetVMRecord``: whichever executor replica serves the sandbox reads and
writes the same record, and one that restarts, or replaces another, finds
it there. Every byte read back is checked: the seal (key and VM name), then
the record's own fields (journal.Record.from_json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from agentvm.common.errors import Aborted, NotFound, RemoteError
from agentvm.executor.journal import Record
from agentvm.executor.record_seal import RecordKey, RecordUnreadable
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc

log = logging.getLogger("agentvm.executor.records")

RPC_TIMEOUT_S = 30.0


class VMRecords:
    """Read and write sandbox records through vm-manager (or a fleet of them)."""

    def __init__(self, vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub, key_file: Path):
        self.vmm = vmm
        self.key_file = key_file
        self._key: RecordKey | None = None

    @property
    def key(self) -> RecordKey:
        """The group's record key, read (or made) at first use: FailedPrecondition
        naming the file when it is unusable."""
        if self._key is None:
            self._key = RecordKey.load_or_create(self.key_file)
        return self._key

    def encode(self, record: Record) -> bytes:
        return self.key.seal(record.vm_name, json.dumps(record.to_json()).encode())

    def decode(self, vm: common_pb2.VM) -> Record:
        """The record ``vm`` carries; RecordUnreadable for anything else."""
        data = self.key.open(vm.name, vm.record)
        try:
            record = Record.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError, DecodeError) as exc:
            raise RecordUnreadable(f"the record of {vm.name} does not parse ({exc})") from None
        if record.vm_name != vm.name:
            raise RecordUnreadable(f"the record of {vm.name} names VM {record.vm_name}")
        return record

    async def write(self, record: Record, expected_generation: int) -> int:
        """Replace the record of ``record.vm_name`` if nobody wrote it since
        ``expected_generation``; its new generation. Aborted when somebody did."""
        req = vm_manager_pb2.SetVMRecordRequest(
            name=record.vm_name,
            record=self.encode(record),
            expected_generation=expected_generation,
        )
        try:
            resp = await self.vmm.SetVMRecord(req, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                raise Aborted(
                    f"sandbox {record.id} was changed by another executor replica meanwhile: "
                    "try again"
                ) from exc
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        return resp.vm.record_generation

    async def read(self, vm_name: str) -> tuple[common_pb2.VM, Record | None]:
        """The VM and its record (None: never written). NotFound when the VM is gone;
        RecordUnreadable when its record is not one this key opens."""
        try:
            vm = (
                await self.vmm.GetVM(
                    vm_manager_pb2.GetVMRequest(name=vm_name), timeout=RPC_TIMEOUT_S
                )
            ).vm
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or f"no VM {vm_name}") from exc
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        if not vm.record_generation or not vm.record:
            return vm, None
        return vm, self.decode(vm)
