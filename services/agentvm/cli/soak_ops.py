"""The soak's operations: real work through the public client, every result checked.

Each operation takes its own seeded RNG and raises :class:`WrongResult` when a
result is not what it must be (a hash, an exit code, missing output); the
client's own errors (``AgentVMError``) propagate for the runner to judge
against the faults in flight (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import agent_vm
from agent_vm._types import Workspace
from agentvm.cli import soak_e2b

__all__ = ["OPS", "SOAK_LABEL", "Context", "Unreachable", "WrongResult", "still_serves"]

SOAK_LABEL = "agent-vm/soak"
# A sandbox's life bounds it even if the soak dies (the executor reclaims it).
LIFETIME_S = 900.0
CALL_TIMEOUT_S = 300.0


class WrongResult(Exception):
    """A result that is not what the operation must produce: always a failure."""


class Unreachable(Exception):
    """A target the sandbox's policy allows did not answer it: explained only while
    what its traffic goes through was down (vm-manager's DNS resolver, libvirt)."""


@dataclass
class Context:
    """What the operations of one run share: the run's id and its open sandboxes."""

    run_id: str
    address: str | None = None
    # The E2B API, when the soak was given a key (else no "e2b" operations).
    e2b: soak_e2b.E2B | None = None
    # A named image for "image" operations (else none).
    image: str = ""
    # HOST:PORT endpoints for "network" operations (else none): see network().
    net_targets: tuple[str, ...] = ()
    # Sandboxes whose close failed, closed again at the end of the run.
    unclosed: dict[str, agent_vm.AsyncSandbox] = field(default_factory=dict)

    async def sandbox(
        self,
        workspace: Workspace = "auto",
        image: str | None = None,
        policy: agent_vm.NetworkPolicy | None = None,
    ) -> agent_vm.AsyncSandbox:
        return await agent_vm.AsyncSandbox.create(
            image=image,
            network="isolated" if policy is None else "nat-filtered",
            policy=policy,
            workspace=workspace,
            lifetime=LIFETIME_S,
            metadata={SOAK_LABEL: self.run_id},
            address=self.address,
            request_timeout=CALL_TIMEOUT_S,
        )

    async def close(self, sb: agent_vm.AsyncSandbox) -> None:
        try:
            await sb.close()
        except agent_vm.AgentVMError:
            self.unclosed[sb.id] = sb
            raise


def _expect(what: str, got: object, want: object) -> None:
    if got != want:
        raise WrongResult(f"{what}: got {got!r}, expected {want!r}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def oneshot(ctx: Context, rng: random.Random) -> None:
    """A one-shot run in a fresh VM prints the hash of a token."""
    token = rng.randbytes(16).hex()
    code = f"import hashlib; print(hashlib.sha256({token!r}.encode()).hexdigest())"
    res = await agent_vm.arun(
        code=code, network="isolated", timeout=CALL_TIMEOUT_S, address=ctx.address
    )
    _expect("one-shot exit code", res.exit_code, 0)
    _expect("one-shot stdout", res.stdout, _sha(token.encode()) + "\n")


async def _in_sandbox(
    ctx: Context,
    body: Callable[[agent_vm.AsyncSandbox], Awaitable[None]],
    workspace: Workspace = "auto",
) -> None:
    sb = await ctx.sandbox(workspace)
    try:
        await body(sb)
    finally:
        await ctx.close(sb)


async def files(ctx: Context, rng: random.Random) -> None:
    """Bytes up are hashed in the guest; bytes the guest makes come down whole."""
    up = rng.randbytes(rng.randint(1024, 2 * 2**20))
    down_size = rng.randint(1024, 2 * 2**20)

    async def body(sb: agent_vm.AsyncSandbox) -> None:
        _expect("upload size", await sb.files.write("work/soak-up", up), len(up))
        res = await sb.run("sha256sum /workspace/work/soak-up", timeout=CALL_TIMEOUT_S)
        _expect("guest sha256sum exit code", res.exit_code, 0)
        _expect("hash of the upload in the guest", res.stdout.split(" ")[0], _sha(up))
        make = (
            f"head -c {down_size} /dev/urandom > /workspace/work/soak-down && "
            "sha256sum /workspace/work/soak-down"
        )
        res = await sb.run(make, timeout=CALL_TIMEOUT_S)
        _expect("guest head|sha256sum exit code", res.exit_code, 0)
        got = await sb.files.read("work/soak-down")
        _expect("download size", len(got), down_size)
        _expect("hash of the download", _sha(got), res.stdout.split(" ")[0])

    await _in_sandbox(ctx, body)


async def pause(ctx: Context, rng: random.Random) -> None:
    """A file written before a pause reads back the same after the resume."""
    data = rng.randbytes(rng.randint(1024, 256 * 1024))

    async def body(sb: agent_vm.AsyncSandbox) -> None:
        await sb.files.write("work/soak-kept", data)
        await sb.pause()
        _expect("state after pause", sb.info().state, "paused")
        await sb.resume()
        _expect("state after resume", sb.info().state, "running")
        _expect("file after resume", _sha(await sb.files.read("work/soak-kept")), _sha(data))

    await _in_sandbox(ctx, body, workspace="api")


async def process(ctx: Context, rng: random.Random) -> None:
    """A background process's output and exit code arrive."""
    token = secrets.token_hex(8)
    code = rng.randint(0, 7)

    async def body(sb: agent_vm.AsyncSandbox) -> None:
        proc = await sb.processes.start(["sh", "-c", f"sleep 1; echo {token}; exit {code}"])
        out = bytearray()
        ended = await proc.wait(lambda piece: out.extend(piece.data))
        _expect("background process exit code", ended.exit_code, code)
        _expect("background process output", bytes(out), f"{token}\n".encode())

    await _in_sandbox(ctx, body)


async def stream(ctx: Context, rng: random.Random) -> None:
    """A command's 256 KiB of stdout arrives exactly."""
    token = rng.randbytes(6).hex()
    size = 256 * 1024
    line = f"{token}\n".encode()
    want = (line * (size // len(line) + 1))[:size]

    async def body(sb: agent_vm.AsyncSandbox) -> None:
        res = await sb.run(f"yes {token} | head -c {size}", timeout=CALL_TIMEOUT_S)
        _expect("stream exit code", res.exit_code, 0)
        _expect("stream bytes (hash)", _sha(res.stdout_bytes), _sha(want))

    await _in_sandbox(ctx, body)


async def terminal(ctx: Context, rng: random.Random) -> None:
    """A shell on a terminal: typed input runs, its output comes back, ``exit`` ends it."""
    a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)

    async def body(sb: agent_vm.AsyncSandbox) -> None:
        shell = await sb.processes.start(["sh"], pty=(24, 80))
        await shell.send_input(f"echo $(( {a} * {b} ))\nexit 3\n")
        out = bytearray()
        ended = await asyncio.wait_for(shell.wait(lambda p: out.extend(p.data)), 120)
        _expect("terminal shell exit code", ended.exit_code, 3)
        if str(a * b).encode() not in out:
            raise WrongResult(f"terminal output lacks {a * b}: {bytes(out)[-200:]!r}")

    await _in_sandbox(ctx, body)


async def image(ctx: Context, rng: random.Random) -> None:
    """A sandbox of a named image: a file written through the API is read by its shell."""
    token = rng.randbytes(8).hex()
    sb = await ctx.sandbox(image=ctx.image)
    try:
        await sb.files.write("work/soak-image", token)
        res = await sb.run(["sh", "-c", "cat /workspace/work/soak-image"], timeout=CALL_TIMEOUT_S)
        _expect("image sandbox exit code", res.exit_code, 0)
        _expect("file read in the image", res.stdout, token)
    finally:
        await ctx.close(sb)


# Run in the guest with TRIES SPEC...: "SPEC open" or "SPEC blocked:WHY" for each
# HOST:PORT given, the first (the allowed one) tried TRIES times 3 s apart (DNS
# may be coming back from a fault), the others once.
NET_PROBE = r"""
import socket, sys, time
def probe(spec, tries):
    host, _, port = spec.rpartition(":")
    why = ""
    for i in range(tries):
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
                if s.recv(64):
                    return "open"
                why = "no-answer"
        except OSError as exc:
            why = type(exc).__name__
        if i + 1 < tries:
            time.sleep(3)
    return "blocked:" + why
print(sys.argv[2], probe(sys.argv[2], int(sys.argv[1])), flush=True)
for spec in sys.argv[3:]:
    print(spec, probe(spec, 1), flush=True)
"""


NET_TRIES = 6


def _policy(target: str) -> agent_vm.NetworkPolicy:
    host, _, port = target.rpartition(":")
    return agent_vm.NetworkPolicy(allow_domains=[host], ports=[int(port)])


async def _only(sb: agent_vm.AsyncSandbox, allowed: str, targets: tuple[str, ...]) -> None:
    """``allowed`` answers the sandbox and no other target does."""
    others = [t for t in targets if t != allowed]
    res = await sb.run(
        ["python3", "-c", NET_PROBE, str(NET_TRIES), allowed, *others], timeout=CALL_TIMEOUT_S
    )
    _expect("network probe exit code", res.exit_code, 0)
    seen = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    _expect("targets probed", sorted(seen), sorted(targets))
    for spec in others:
        if not seen[spec].startswith("blocked:"):
            raise WrongResult(f"{spec} answered a sandbox whose policy allows only {allowed}")
    if seen[allowed] != "open":
        raise Unreachable(f"{allowed} (allowed by the policy) not reached: {seen[allowed]}")


async def network(ctx: Context, rng: random.Random) -> None:
    """A nat-filtered sandbox whose policy allows one target, then, changed while
    it runs, another (both drawn anew for each sandbox, so the NAT filter's
    policies change all the time): each time that one answers and the others are
    never reached. A blocked target that answers is a wrong result whatever the
    faults; an allowed one that does not is judged (Unreachable)."""
    if len(ctx.net_targets) < 2:
        raise WrongResult("a network operation without two --network-targets")
    first, then = rng.sample(ctx.net_targets, 2)
    sb = await ctx.sandbox(policy=_policy(first))
    try:
        await _only(sb, first, ctx.net_targets)
        got = await sb.set_network_policy(_policy(then))
        _expect("policy in effect after the change", got, _policy(then))
        await _only(sb, then, ctx.net_targets)
    finally:
        await ctx.close(sb)


async def e2b(ctx: Context, rng: random.Random) -> None:
    """The E2B-compatible API: a sandbox, a file up and back, killed (soak_e2b)."""
    if ctx.e2b is None:
        raise WrongResult("an e2b operation without an E2B API key")
    await soak_e2b.e2b(ctx.e2b, rng)


OPS: dict[str, Callable[[Context, random.Random], Awaitable[None]]] = {
    "oneshot": oneshot,
    "files": files,
    "pause": pause,
    "process": process,
    "stream": stream,
    "terminal": terminal,
    "e2b": e2b,
    "image": image,
    "network": network,
}


async def still_serves(sb: agent_vm.AsyncSandbox) -> None:
    """The sandbox answers a command after a client abused one of its streams."""
    res = await asyncio.wait_for(sb.run("echo still", timeout=60), 120)
    _expect("a command after the abuse", res.stdout, "still\n")
