"""`agent-vm soak`: real work for N minutes, faults from a seed, every result checked.

The runner: workers carry out :mod:`.soak_ops`, an injector the faults of
:mod:`.soak_plan`'s schedule, a sampler the services' memory; at the end the
errors are judged against the faults' windows and :mod:`.soak_check` looks
for leaks (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

import agent_vm
from agentvm.cli import soak_check, soak_e2b, soak_faults, soak_ops, soak_plan
from agentvm.cli.base import handle_errors
from agentvm.cli.soak_faults import RECOVERY_S, FaultDone
from agentvm.common.config import Settings

__all__ = ["Config", "Outcome", "judge", "render", "run", "soak_cmd"]

# How long the teardowns of closed sandboxes get before leaks count.
SETTLE_S = 120.0
SAMPLE_EVERY_S = 5.0
# A worker's pause after an error.
ERROR_PAUSE_S = 1.0


@dataclass(frozen=True)
class Config:
    minutes: float
    seed: int
    concurrency: int
    faults: tuple[str, ...]
    fault_every_s: float
    # The E2B API (URL, key): adds "e2b" operations.
    e2b: tuple[str, str] | None = None
    # A named image: adds "image" operations.
    image: str = ""
    # HOST:PORT endpoints behind the NAT network: adds "network" operations.
    net_targets: tuple[str, ...] = ()


@dataclass
class Outcome:
    """One operation or fault: what, when (seconds from the start), how it ended."""

    kind: str
    start_s: float
    end_s: float
    error_code: str = ""
    message: str = ""
    wrong: bool = False

    @property
    def ok(self) -> bool:
        return not self.error_code and not self.wrong


@dataclass
class State:
    cfg: Config
    settings: Settings
    say: Callable[[str], None]
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    began: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[FaultDone] = field(default_factory=list)
    samples: list[soak_check.RssSample] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.began

    @property
    def ends_at(self) -> float:
        return self.cfg.minutes * 60.0


def judge(outcome: Outcome, faults: list[FaultDone]) -> str:
    """ "" when the outcome is fine or explained by a fault, else why it is a failure."""
    if outcome.ok:
        return ""
    if outcome.wrong:
        return f"wrong result: {outcome.message}"
    for f in faults:
        window = (f.start_s, f.recovered_s + soak_plan.GRACE_S)
        overlaps = outcome.start_s <= window[1] and outcome.end_s >= window[0]
        if overlaps and outcome.error_code in soak_plan.allowed(f.kind, outcome.kind):
            return ""
    return f"{outcome.error_code}: {outcome.message}"


async def _worker(st: State, ctx: soak_ops.Context, n: int) -> None:
    kinds = soak_plan.OP_KINDS + ((soak_plan.E2B_OP,) if ctx.e2b else ())
    kinds += (soak_plan.IMAGE_OP,) if ctx.image else ()
    kinds += (soak_plan.NETWORK_OP,) if ctx.net_targets else ()
    for kind, rng in soak_plan.operations(st.cfg.seed, n, kinds):
        if st.now() >= st.ends_at:
            return
        out = Outcome(kind, st.now(), 0.0)
        try:
            await soak_ops.OPS[kind](ctx, rng)
        except soak_ops.WrongResult as exc:
            out.wrong, out.message = True, str(exc)
        except soak_ops.Unreachable as exc:
            out.error_code, out.message = "UNREACHABLE", str(exc)[:300]
        except agent_vm.AgentVMError as exc:
            out.error_code, out.message = exc.code, str(exc)[:300]
        except TimeoutError as exc:  # the soak's own bound on a step: judged as a deadline
            out.error_code, out.message = "DEADLINE_EXCEEDED", f"no answer in time ({exc!r})"
        except Exception as exc:  # noqa: BLE001 - anything else is a failure to report, not a crash
            out.wrong, out.message = True, f"unexpected {type(exc).__name__}: {exc}"[:300]
        out.end_s = st.now()
        st.outcomes.append(out)
        if not out.ok:
            st.say(f"{out.end_s:7.1f}s {kind}: {out.error_code or 'WRONG'} {out.message[:160]}")
            await asyncio.sleep(ERROR_PAUSE_S)  # a service down is not to be hammered


async def _injector(st: State, ctx: soak_ops.Context) -> None:
    schedule = soak_plan.fault_schedule(
        st.cfg.seed, st.cfg.minutes, st.cfg.faults, st.cfg.fault_every_s
    )
    for fault in schedule:
        await asyncio.sleep(max(0.0, fault.at_s - st.now()))
        try:
            done = await soak_faults.inject(fault.kind, st.settings, ctx, st.now)
        except Exception as exc:  # noqa: BLE001 - an injector's own bug must not end the schedule
            done = FaultDone(fault.kind, st.now(), st.now(), failed=f"injector: {exc!r}"[:300])
        st.faults.append(done)
        what = done.failed or done.note or "recovered"
        took = done.recovered_s - done.start_s
        st.say(f"{done.start_s:7.1f}s fault {done.kind}: {what} ({took:.1f} s)")


async def _sampler(st: State) -> None:
    while st.now() < st.ends_at:
        pids = await asyncio.to_thread(soak_check.service_pids, st.settings)
        for svc, (pid, _h) in pids.items():
            rss = soak_check.rss_kib(pid) if pid else None
            if pid and rss is not None:
                st.samples.append(soak_check.RssSample(st.now(), svc, pid, rss, len(st.outcomes)))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def _close_left(ctx: soak_ops.Context, st: State) -> list[str]:
    """Close what a failed close left open; what stays open is reported."""
    left: list[str] = []
    for sid, sb in list(ctx.unclosed.items()):
        deadline = time.monotonic() + RECOVERY_S
        while True:
            try:
                await sb.close()
                break
            except agent_vm.NotFoundError:
                break  # closed by its failed call after all
            except agent_vm.AgentVMError as exc:
                if time.monotonic() > deadline:
                    left.append(f"sandbox {sid} could not be closed: {exc}")
                    break
                await asyncio.sleep(2)
    return left


async def _settled_leaks(st: State) -> list[str]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            found = await asyncio.to_thread(
                soak_check.leaks, st.settings, st.run_id, soak_ops.SOAK_LABEL
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a service still down: look again
            found = [f"the leak check could not finish: {type(exc).__name__}: {exc}"[:300]]
        if not found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(3)


def _latency(outcomes: list[Outcome]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in sorted({o.kind for o in outcomes}):
        d = sorted(o.end_s - o.start_s for o in outcomes if o.kind == kind and o.ok)
        if d:
            p99 = d[min(len(d) - 1, round(0.99 * (len(d) - 1)))]
            out[kind] = {
                "n": len(d),
                "p50_s": round(statistics.median(d), 2),
                "p99_s": round(p99, 2),
            }
    return out


def _per_minute(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for minute in range(int(max((o.end_s for o in outcomes), default=0) // 60) + 1):
        d = sorted(o.end_s - o.start_s for o in outcomes if o.ok and o.end_s // 60 == minute)
        rows.append(
            {
                "minute": minute,
                "ok": len(d),
                "p50_s": round(statistics.median(d), 2) if d else None,
                "p99_s": round(d[round(0.99 * (len(d) - 1))], 2) if d else None,
            }
        )
    return rows


async def _main(st: State) -> dict[str, Any]:
    ctx = soak_ops.Context(
        st.run_id,
        address=st.settings.executor_addr,
        image=st.cfg.image,
        net_targets=st.cfg.net_targets,
    )
    if st.cfg.e2b:
        url, key = st.cfg.e2b
        ctx.e2b = soak_e2b.E2B(url, key, st.run_id, soak_ops.SOAK_LABEL)
    started_wall = time.time()
    workers = [asyncio.create_task(_worker(st, ctx, n)) for n in range(st.cfg.concurrency)]
    side = [asyncio.create_task(_injector(st, ctx)), asyncio.create_task(_sampler(st))]
    await asyncio.gather(*workers)
    for task in side:
        task.cancel()
    await asyncio.gather(*side, return_exceptions=True)
    left = await _close_left(ctx, st)
    leaks = left + await _settled_leaks(st)
    killed = [f for f in st.faults if f.kind.startswith("kill:") and f.recovered_s > f.start_s]
    kills = Counter(f.kind.removeprefix("kill:") for f in killed)
    audit: list[str] = []
    for _ in range(10):  # the monitor writes what reporters queued within seconds
        try:
            audit = await asyncio.to_thread(
                soak_check.audit_problems,
                st.settings.audit_dir,
                started_wall,
                dict(kills),
                [f.vm for f in st.faults if f.kind == "guest-panic" and f.vm],
                sum(1 for f in st.faults if f.kind == "libvirtd-restart" and not f.failed),
            )
        except (OSError, ValueError) as exc:
            audit = [f"the audit log in {st.settings.audit_dir} could not be read: {exc}"]
        if not audit:
            break
        await asyncio.sleep(3)
    failures = [(o, why) for o in st.outcomes if (why := judge(o, st.faults))]
    fault_failures = [f"{f.kind} at {f.start_s:.1f}s: {f.failed}" for f in st.faults if f.failed]
    rss = soak_check.rss_growth(st.samples)
    memory = soak_check.memory_failures(rss)
    return {
        "run_id": st.run_id,
        "seed": st.cfg.seed,
        "minutes": st.cfg.minutes,
        "concurrency": st.cfg.concurrency,
        "schedule": [
            f.view()
            for f in soak_plan.fault_schedule(
                st.cfg.seed, st.cfg.minutes, st.cfg.faults, st.cfg.fault_every_s
            )
        ],
        "operations": dict(Counter(o.kind for o in st.outcomes)),
        "operations_ok": sum(o.ok for o in st.outcomes),
        "errors_explained": sum(1 for o in st.outcomes if not o.ok and not judge(o, st.faults)),
        "errors_by_code": dict(Counter(o.error_code for o in st.outcomes if o.error_code)),
        "faults": [
            {
                "kind": f.kind,
                "at_s": round(f.start_s, 1),
                "recovery_s": round(f.recovered_s - f.start_s, 1),
                "note": f.note,
                "failed": f.failed,
            }
            for f in st.faults
        ],
        "failures": [f"{o.kind} at {o.start_s:.1f}s: {why}" for o, why in failures]
        + fault_failures
        + memory,
        "leaks": leaks,
        "audit_problems": audit,
        "latency": _latency(st.outcomes),
        "latency_per_minute": _per_minute(st.outcomes),
        "service_rss": rss,
        "rss_over_time": soak_check.rss_series(st.samples),
    }


def run(cfg: Config, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """One soak; the report (``failures``, ``leaks`` and ``audit_problems`` empty: passed)."""
    st = State(cfg, settings, say)
    return asyncio.run(_main(st))


def _check_ready(settings: Settings, kinds: tuple[str, ...]) -> None:
    """Refuse to start when a service is down, or kills are asked without a supervisor."""
    from agentvm.cli import supervisor as sup
    from agentvm.cli.group import fail

    down = [svc for svc, (_pid, h) in soak_check.service_pids(settings).items() if h != "SERVING"]
    if down:
        fail(f"not SERVING: {', '.join(down)}; start the installation first (`agent-vm up`)")
    if "state-disk-full" in kinds and not soak_faults.own_file_system(settings.state_dir):
        fail(
            f"state-disk-full fills the file system of {settings.state_dir}, which is not a "
            "file system of its own here (filling it would fill the host's): mount one "
            "there for the installation (e.g. an ext4 on a loop device; not tmpfs, which "
            "refuses the O_DIRECT QEMU opens disks with), or leave the kind out"
        )
    if any(k.startswith("kill:") for k in kinds) and sup.running_pid(settings) is None:
        fail(
            "service kills need the supervisor of `agent-vm up` to start a killed service "
            "again, and none runs: bring the installation up with `agent-vm up`, or pass "
            "--faults without kill (e.g. --faults disconnect,slow-reader)"
        )


@click.command("soak")
@click.option(
    "--minutes", type=click.FloatRange(1, 24 * 60), default=5.0, show_default=True,
    help="How long the work runs (faults stop a minute before its end).",
)  # fmt: skip
@click.option(
    "--seed", type=int, default=1, show_default=True, help="Draws the faults and the work."
)
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=2, show_default=True,
    help="Workers running operations side by side.",
)  # fmt: skip
@click.option(
    "--faults", default="all", show_default=True,
    help="all, none, kill (every service kill), or a comma list of: "
    + ", ".join(soak_plan.FAULT_KINDS)
    + "; state-disk-full only by name (STATE_DIR must be a file system of its own).",
)  # fmt: skip
@click.option(
    "--fault-every", type=click.FloatRange(15, 3600), default=60.0, show_default=True,
    help="Mean seconds between faults.",
)  # fmt: skip
@click.option(
    "--e2b-key", envvar="E2B_API_KEY", default="",
    help="An E2B API key (`agent-vm e2b key create`): adds E2B API calls to the work "
    "(default: $E2B_API_KEY; the gateway's URL is $E2B_API_URL, else its own address).",
)  # fmt: skip
@click.option(
    "--image", "image_name", default="",
    help="A named image (`agent-vm image list`): adds sandboxes of that image to the work.",
)  # fmt: skip
@click.option(
    "--network-targets", default="",
    help="HOST:PORT,HOST:PORT,... (two or more TCP endpoints that answer, reached "
    "through the NAT network): adds nat-filtered sandboxes whose policy allows one "
    "of them, checked to reach it and none of the others. Only hosts you own.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--plot", type=click.Path(dir_okay=False, writable=True), default=None,
    help="Also write service memory and latency over time, faults marked, as an SVG file.",
)  # fmt: skip
@handle_errors
def soak_cmd(
    minutes: float,
    seed: int,
    concurrency: int,
    faults: str,
    fault_every: float,
    e2b_key: str,
    image_name: str,
    network_targets: str,
    as_json: bool,
    plot: str | None,
) -> None:
    """Run real work with faults injected from a seed; check every result and leaks.

    Exit 0 when no failure is unexplained, nothing leaked and the audit chain
    verifies (docs/RELIABILITY.md); 1 otherwise.
    """
    import json
    import os
    import sys

    from agentvm.cli.base import settings
    from agentvm.cli.group import fail

    try:
        kinds = soak_plan.expand_kinds(faults)
    except ValueError as exc:
        fail(f"--faults: {exc}")
    try:
        targets = soak_plan.parse_targets(network_targets)
    except ValueError as exc:
        fail(f"--network-targets: {exc}")
    s = settings()
    _check_ready(s, kinds)
    schedule = soak_plan.fault_schedule(seed, minutes, kinds, fault_every)
    say: Callable[[str], None] = lambda line: click.echo(line, err=True)  # noqa: E731
    say(f"soak: {minutes:g} min, seed {seed}, {concurrency} workers, {len(schedule)} faults: "
        + (", ".join(f"{f.at_s:.0f}s {f.kind}" for f in schedule) or "none"))  # fmt: skip
    e2b = None
    if e2b_key:
        from agentvm.cli.e2b_cmds import gateway_url

        url = os.environ.get("E2B_API_URL") or gateway_url(s)
        e2b = (url, e2b_key)
    cfg = Config(minutes, seed, concurrency, kinds, fault_every, e2b, image_name, targets)
    report = run(cfg, s, say)
    passed = not (report["failures"] or report["leaks"] or report["audit_problems"])
    if plot:
        from pathlib import Path

        from agentvm.cli.soak_plot import render_svg

        Path(plot).write_text(render_svg(report))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report))
    sys.exit(0 if passed else 1)


def render(report: dict[str, Any]) -> str:
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report["operations"].items()))
    lines = [
        f"soak {report['run_id']}: {report['minutes']:g} min, seed {report['seed']}",
        f"operations: {sum(report['operations'].values())} ({ops}); "
        f"ok {report['operations_ok']}, explained errors {report['errors_explained']}",
        "faults: "
        + (", ".join(f"{f['kind']} ({f['recovery_s']} s)" for f in report["faults"]) or "none"),
    ]
    for kind, lat in report["latency"].items():
        lines.append(f"  {kind}: n={lat['n']} p50 {lat['p50_s']} s p99 {lat['p99_s']} s")
    for svc, rss in report["service_rss"].items():
        lines.append(
            f"  {svc}: RSS {rss['first_rss_mib']} -> {rss['last_rss_mib']} MiB "
            f"(max {rss['max_rss_mib']}), {rss['pooled_growth_mib_per_1k_ops']} MiB per 1k ops "
            f"over {rss['pooled_ops']} after warm-up ({rss['processes']} processes; "
            f"longest life {rss['longest_life_ops']} ops: {rss['growth_mib_per_1k_ops']})"
        )
    for title in ("failures", "leaks", "audit_problems"):
        items = report[title]
        lines.append(f"{title.replace('_', ' ')}: {len(items)}")
        lines += [f"  - {x}" for x in items]
    return "\n".join(lines)
