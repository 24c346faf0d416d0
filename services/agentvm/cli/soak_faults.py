"""The soak's faults, each carried out for real and checked (docs/RELIABILITY.md).

Each injector returns a :class:`FaultDone`: when it began, when the system
was whole again (the window in which other operations' errors may be
explained), and ``failed`` when the system did not come back as it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import agent_vm
from agentvm.cli import soak_check, soak_ops
from agentvm.common.config import Settings

__all__ = ["RECOVERY_S", "FaultDone", "inject", "own_file_system", "restart_libvirtd"]

# How long a service, or libvirtd, gets to serve again after a fault.
RECOVERY_S = 180.0
# How long a panicked guest's command gets to end with an error.
PANIC_S = 120.0
# How long a hung guest stays stopped.
HANG_S = 20.0
# How long the state directory's file system stays full, and the MiB left free.
FULL_S = 20.0
FULL_LEAVE_MIB = 4


@dataclass
class FaultDone:
    kind: str
    start_s: float
    recovered_s: float
    note: str = ""
    failed: str = ""
    # The VM the fault hit, when it hit one (its audit records are looked for).
    vm: str = ""


class _Injector:
    def __init__(self, settings: Settings, ctx: soak_ops.Context, now: Callable[[], float]) -> None:
        self.settings, self.ctx, self.now = settings, ctx, now

    async def kill(self, service: str) -> FaultDone:
        """SIGKILL of a service; whole again once the supervisor has it SERVING."""
        kind, start = f"kill:{service}", self.now()
        pids = await asyncio.to_thread(soak_check.service_pids, self.settings)
        pid, _health = pids.get(service, (None, ""))
        if pid is None:
            return FaultDone(kind, start, start, note="not running: skipped")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + RECOVERY_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            rows = await asyncio.to_thread(soak_check.service_pids, self.settings)
            now_pid, health = rows[service]
            if now_pid not in (None, pid) and health == "SERVING":
                return FaultDone(kind, start, self.now(), note=f"pid {pid} -> {now_pid}")
        return FaultDone(
            kind, start, self.now(), failed=f"not SERVING {RECOVERY_S:.0f} s after the kill"
        )

    async def abuse_stream(self, kind: str) -> FaultDone:
        """A client that cancels a flowing stream, or reads one too slowly for its deadline."""
        start = self.now()
        failed = ""
        try:
            sb = await self.ctx.sandbox()
            try:
                if kind == "disconnect":
                    got = asyncio.Event()
                    task = asyncio.create_task(
                        sb.run("yes agent-vm-soak", timeout=120, on_stdout=lambda _b: got.set())
                    )
                    await asyncio.wait_for(got.wait(), 60)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, agent_vm.AgentVMError):
                        await task
                else:
                    cmd = ["sh", "-c", "yes agent-vm-soak | head -c 50M"]
                    proc = await sb.processes.start(cmd)

                    async def slow() -> None:
                        async for _piece in proc.output():
                            await asyncio.sleep(0.5)

                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(slow(), 5)
                    # The guest keeps a process's output in a bounded ring, so a
                    # slow reader never holds the writer back: it may have ended.
                    with contextlib.suppress(agent_vm.FailedPreconditionError):
                        await proc.kill()
                await soak_ops.still_serves(sb)
            finally:
                await self.ctx.close(sb)
        except (agent_vm.AgentVMError, soak_ops.WrongResult, TimeoutError) as exc:
            failed = f"{type(exc).__name__}: {exc}"[:300]
        return FaultDone(kind, start, self.now(), failed=failed)

    async def guest_panic(self) -> FaultDone:
        """A sandbox's guest kernel panics: its command ends with an error naming its VM,
        in bounded time; its close then succeeds or finds it gone."""
        start = self.now()
        failed = ""
        sb = await self.ctx.sandbox()
        try:
            await asyncio.wait_for(
                sb.run("echo c > /proc/sysrq-trigger; sleep 300", timeout=300), PANIC_S
            )
            failed = "the command of a panicked guest ended without an error"
        except TimeoutError:
            failed = f"the command of a panicked guest still ran after {PANIC_S:.0f} s"
        except agent_vm.AgentVMError as exc:
            if sb.vm_name not in str(exc):
                failed = f"the error does not name the VM {sb.vm_name}: {exc}"[:300]
        await self._close(sb)
        return FaultDone("guest-panic", start, self.now(), failed=failed, vm=sb.vm_name)

    async def guest_hang(self) -> FaultDone:
        """A guest that stops answering: its QEMU is stopped (SIGSTOP) for HANG_S while a
        command runs in it, then continued. The command must end with its whole output
        (or a documented error), and the sandbox must answer again."""
        start = self.now()
        failed = ""
        sb = await self.ctx.sandbox()
        try:
            pid = _qemu_pid(sb.vm_name)
            call = asyncio.create_task(
                sb.run("echo before; sleep 2; echo after", timeout=HANG_S * 4)
            )
            await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(HANG_S)
            finally:
                os.kill(pid, signal.SIGCONT)
            try:
                res = await asyncio.wait_for(call, RECOVERY_S)
                if (res.exit_code, res.stdout) != (0, "before\nafter\n"):
                    failed = f"after the hang: exit {res.exit_code}, stdout {res.stdout!r}"
            except agent_vm.AgentVMError as exc:
                if exc.code not in ("DEADLINE_EXCEEDED", "UNAVAILABLE"):
                    failed = f"the command in the hung guest: {exc.code}: {exc}"[:300]
            if not failed:
                await soak_ops.still_serves(sb)
        except (agent_vm.AgentVMError, soak_ops.WrongResult, TimeoutError, OSError) as exc:
            failed = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            await self._close(sb)
        return FaultDone("guest-hang", start, self.now(), failed=failed)

    async def fill_state_disk(self) -> FaultDone:
        """STATE_DIR's file system full for FULL_S: new VMs are refused, VMs whose disk
        cannot grow are paused by QEMU. Whole again once vm-manager holds no VM for
        its disk (it resumes them by itself when the room is back)."""
        start = self.now()
        filler = self.settings.state_dir / "soak-filler"
        try:
            await asyncio.to_thread(_fill, filler, FULL_LEAVE_MIB)
            await asyncio.sleep(FULL_S)
        except OSError as exc:
            return FaultDone("state-disk-full", start, self.now(), failed=f"filling: {exc}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()
        deadline = time.monotonic() + RECOVERY_S
        while held := await asyncio.to_thread(soak_check.held_vms):
            if time.monotonic() > deadline:
                failed = f"still held {RECOVERY_S:.0f} s after room was made: {held[:3]}"
                return FaultDone("state-disk-full", start, self.now(), failed=failed)
            await asyncio.sleep(1.0)
        return FaultDone("state-disk-full", start, self.now())

    async def _close(self, sb: agent_vm.AsyncSandbox) -> None:
        """Close a sandbox a fault may have ended already; a failed close is retried later."""
        try:
            await sb.close()
        except agent_vm.AgentVMError as exc:
            if not isinstance(exc, agent_vm.NotFoundError):
                self.ctx.unclosed[sb.id] = sb

    async def restart_libvirtd(self) -> FaultDone:
        """What an upgrade or an OOM kill does to libvirtd (QEMU processes live on)."""
        start = self.now()
        failed = await asyncio.to_thread(restart_libvirtd, self.settings.libvirt_uri)
        return FaultDone("libvirtd-restart", start, self.now(), failed=failed)


def _qemu_pid(vm_name: str) -> int:
    """The QEMU process of a local VM, from libvirt's pid file (the system driver's)."""
    return int(Path(f"/run/libvirt/qemu/{vm_name}.pid").read_text().strip())


def own_file_system(path: Path) -> bool:
    """Whether ``path`` is a mount point (a file system of its own, not the host's)."""
    return path.is_dir() and os.path.ismount(path) and path.resolve() != Path("/")


def _fill(filler: Path, leave_mib: int) -> None:
    """Take all but ``leave_mib`` of ``filler``'s file system (blocks really allocated)."""
    st = os.statvfs(filler.parent)
    size = max(0, st.f_bavail * st.f_frsize - (leave_mib << 20))
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(size, 1))


def _succeeds(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False, timeout=30).returncode == 0


def restart_libvirtd(uri: str) -> str:
    """Restart the local libvirtd (systemd's, else the one started by hand); "" when
    it answers again within RECOVERY_S."""
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True, timeout=RECOVERY_S)
    else:
        subprocess.run(["pkill", "-x", "libvirtd"], check=False, timeout=30)
        deadline = time.monotonic() + 30
        while _succeeds("pgrep", "-x", "libvirtd"):
            if time.monotonic() > deadline:
                return "libvirtd did not exit within 30 s of SIGTERM"
            time.sleep(0.1)
        subprocess.run(["libvirtd", "-d"], check=True, timeout=60)
    deadline = time.monotonic() + RECOVERY_S
    while not _succeeds("virsh", "-c", uri, "version"):
        if time.monotonic() > deadline:
            return f"libvirtd does not answer {RECOVERY_S:.0f} s after its restart"
        time.sleep(0.2)
    return ""


async def inject(
    kind: str, settings: Settings, ctx: soak_ops.Context, now: Callable[[], float]
) -> FaultDone:
    """Carry out one fault of :data:`.soak_plan.FAULT_KINDS`."""
    inj = _Injector(settings, ctx, now)
    if kind.startswith("kill:"):
        return await inj.kill(kind.removeprefix("kill:"))
    if kind == "guest-panic":
        return await inj.guest_panic()
    if kind == "guest-hang":
        return await inj.guest_hang()
    if kind == "libvirtd-restart":
        return await inj.restart_libvirtd()
    if kind == "state-disk-full":
        return await inj.fill_state_disk()
    return await inj.abuse_stream(kind)
