"""The soak's schedule: which operations each worker runs and which faults come when.

Everything here is drawn from the seed alone (docs/RELIABILITY.md), so the
same ``--seed``, ``--minutes`` and fault kinds give the same fault schedule and
the same sequence of operations per worker. No I/O: the runner
(:mod:`.soak`) carries it out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOWED_CODES",
    "ALLOWED_FOR_OP",
    "E2B_OP",
    "IMAGE_OP",
    "NETWORK_OP",
    "FAULT_KINDS",
    "KILLABLE",
    "OPT_IN_FAULTS",
    "OP_KINDS",
    "Fault",
    "allowed",
    "expand_kinds",
    "fault_schedule",
    "operations",
    "parse_targets",
]

OP_KINDS = ("oneshot", "files", "pause", "process", "stream", "terminal")
# Run only when the soak has an E2B API key, a named image, network targets.
E2B_OP = "e2b"
IMAGE_OP = "image"
NETWORK_OP = "network"
# The services a ``kill`` fault hits, in turn.
KILLABLE = ("executor", "vm-manager", "pool-manager", "monitor", "e2b-gateway")
FAULT_KINDS = (
    *(f"kill:{s}" for s in KILLABLE),
    "libvirtd-restart",
    "guest-panic",
    "guest-hang",
    "disconnect",
    "slow-reader",
)
# Faults only asked for by name (not in "all"): the state directory's file system
# filled, which needs an installation whose STATE_DIR is a file system of its own.
OPT_IN_FAULTS = ("state-disk-full",)
# The errors an operation in flight during a fault may get (docs/RELIABILITY.md).
ALLOWED_CODES: dict[str, frozenset[str]] = {
    "kill:executor": frozenset({"UNAVAILABLE", "NOT_FOUND"}),
    "kill:vm-manager": frozenset({"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"}),
    "kill:pool-manager": frozenset({"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"}),
    "kill:monitor": frozenset(),
    "kill:e2b-gateway": frozenset(),
    # A libvirt call cut by the restart: vm-manager answers UNAVAILABLE.
    "libvirtd-restart": frozenset({"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"}),
    "guest-panic": frozenset(),
    "guest-hang": frozenset(),
    "disconnect": frozenset(),
    "slow-reader": frozenset(),
    # New VMs are refused while it is full; a command held past its deadline says so.
    "state-disk-full": frozenset({"RESOURCE_EXHAUSTED"}),
}
# Errors a fault causes only to the operations that go through what it hit:
# E2B calls go through the gateway (their HTTP 502/503 and a refused
# connection read as UNAVAILABLE).
# An allowed network target that did not answer (UNREACHABLE) is explained
# while vm-manager (whose resolver answers the sandbox's DNS) or libvirt is down.
ALLOWED_FOR_OP: dict[tuple[str, str], frozenset[str]] = {
    ("kill:e2b-gateway", E2B_OP): frozenset({"UNAVAILABLE"}),
    ("kill:vm-manager", NETWORK_OP): frozenset({"UNREACHABLE"}),
    ("libvirtd-restart", NETWORK_OP): frozenset({"UNREACHABLE"}),
}


def allowed(fault_kind: str, op_kind: str) -> frozenset[str]:
    """The codes an operation of ``op_kind`` in the window of a ``fault_kind`` may get."""
    return ALLOWED_CODES.get(fault_kind, frozenset()) | ALLOWED_FOR_OP.get(
        (fault_kind, op_kind), frozenset()
    )


# The least time between two faults: a service killed must be back first.
MIN_GAP_S = 15.0
# A fault's window ends this long after its recovery.
GRACE_S = 30.0
# Operations' weights: sandboxes with files are the common case.
_WEIGHTS = {
    "oneshot": 3,
    "files": 3,
    "pause": 1,
    "process": 2,
    "stream": 2,
    "terminal": 1,
    E2B_OP: 2,
    IMAGE_OP: 2,
    NETWORK_OP: 2,
}


@dataclass(frozen=True)
class Fault:
    """One fault: when (seconds from the start of the run) and what."""

    at_s: float
    kind: str

    def view(self) -> dict[str, object]:
        return {"at_s": round(self.at_s, 1), "kind": self.kind}


def expand_kinds(text: str) -> tuple[str, ...]:
    """``--faults`` as kinds: "all", "none", or a comma list ("kill" means every kill).

    Raises ValueError naming the unknown kind and the known ones.
    """
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "all":
        return FAULT_KINDS
    kinds: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "kill":
            kinds += [k for k in FAULT_KINDS if k.startswith("kill:")]
        elif part in FAULT_KINDS or part in OPT_IN_FAULTS:
            kinds.append(part)
        else:
            raise ValueError(
                f"unknown fault kind {part!r}: use all, none, kill, or some of "
                + ", ".join((*FAULT_KINDS, *OPT_IN_FAULTS))
            )
    return tuple(dict.fromkeys(kinds))


def parse_targets(text: str) -> tuple[str, ...]:
    """``--network-targets`` as HOST:PORT strings: none, or at least two distinct.

    Raises ValueError naming the entry that is wrong and the form expected.
    """
    specs = [p.strip() for p in text.split(",") if p.strip()]
    for spec in specs:
        host, sep, port = spec.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{spec!r} is not HOST:PORT (e.g. example.org:80)")
    if len(set(specs)) != len(specs):
        raise ValueError(f"{text!r} names a target twice")
    if len(specs) == 1:
        raise ValueError(
            f"{text!r} is one target: give at least two (one is allowed per sandbox, "
            "the others must be blocked)"
        )
    return tuple(specs)


def fault_schedule(seed: int, minutes: float, kinds: Sequence[str], every_s: float) -> list[Fault]:
    """The faults of a run: exponential gaps of mean ``every_s`` (at least
    :data:`MIN_GAP_S`), none in the last minute (the run must see recovery),
    kinds taken in turn from a seeded shuffle so each comes up."""
    if not kinds:
        return []
    rng = random.Random(f"faults:{seed}")  # noqa: S311 - reproducible from the seed, not secret
    order = list(kinds)
    rng.shuffle(order)
    end = minutes * 60.0 - 60.0
    faults: list[Fault] = []
    at = max(MIN_GAP_S, rng.expovariate(1.0 / every_s))
    while at < end:
        faults.append(Fault(at, order[len(faults) % len(order)]))
        at += max(MIN_GAP_S, rng.expovariate(1.0 / every_s))
    return faults


def operations(
    seed: int, worker: int, kinds: Sequence[str] = OP_KINDS
) -> Iterator[tuple[str, random.Random]]:
    """Worker ``worker``'s endless sequence of (operation kind, its own RNG)."""
    rng = random.Random(f"ops:{seed}:{worker}")  # noqa: S311 - as above
    kinds = list(kinds)
    weights = [_WEIGHTS[k] for k in kinds]
    n = 0
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield kind, random.Random(f"op:{seed}:{worker}:{n}")  # noqa: S311 - as above
        n += 1
