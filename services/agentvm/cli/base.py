"""What every `agent-vm` command shares: one-line errors, settings, channels to the services."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click
import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agentvm.cli.group import fail
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.grpc_util import Caller
from agentvm.v1 import common_pb2

if TYPE_CHECKING:  # imported where used: `agent-vm run` needs neither
    from agentvm.v1 import vm_manager_pb2_grpc

F = TypeVar("F", bound=Callable[..., Any])

PROFILES = {
    "light": common_pb2.RESOURCE_PROFILE_LIGHT,
    "standard": common_pb2.RESOURCE_PROFILE_STANDARD,
    "intensive": common_pb2.RESOURCE_PROFILE_INTENSIVE,
}
NETWORKS = {
    "nat-filtered": common_pb2.NETWORK_MODE_NAT_FILTERED,
    "isolated": common_pb2.NETWORK_MODE_ISOLATED,
    "bridge": common_pb2.NETWORK_MODE_BRIDGE,
}
DEFAULT_NETWORK = "nat-filtered"


def profile_option(default: str = "standard") -> Callable[[F], F]:
    """`--profile`: the resource profile (the same words and help on every command)."""
    return click.option(
        "--profile",
        type=click.Choice(list(PROFILES)),
        default=default,
        show_default=True,
        help="Resource profile: vCPUs, memory and disk (docs/USER_GUIDE.md, 'Resource profiles').",
    )


def network_option() -> Callable[[F], F]:
    """`--network`: the network mode (the same words and help on every command)."""
    return click.option(
        "--network",
        type=click.Choice(list(NETWORKS)),
        default=DEFAULT_NETWORK,
        show_default=True,
        help="nat-filtered: NAT with a domain allowlist; isolated: no network interface; "
        "bridge: on a host bridge.",
    )


def policy_options(func: F) -> F:
    """`--allow-domain/--allow-cidr/--allow-port`: a nat-filtered VM's egress policy
    (the same words and help on every command; see :func:`policy_of`)."""
    for option in reversed(
        [
            click.option(
                "--allow-domain", "allow_domains", multiple=True, metavar="NAME",
                help="Name it may resolve and connect to (repeat; '*.example.com' for a "
                "zone). Replaces the default allowlist.",
            ),
            click.option(
                "--allow-cidr", "allow_cidrs", multiple=True, metavar="CIDR",
                help="Address range it may connect to (repeat).",
            ),
            click.option(
                "--allow-port", "ports", multiple=True, type=click.IntRange(1, 65535),
                metavar="PORT", help="TCP port allowed (repeat; default 80, 443, 22).",
            ),
        ]
    ):  # fmt: skip
        func = option(func)
    return func


def policy_of(
    network: str, allow_domains: Sequence[str], allow_cidrs: Sequence[str], ports: Sequence[int]
) -> common_pb2.NetworkPolicy | None:
    """The policy :func:`policy_options` gave (None: none given); exit 2 naming
    the options when one is given for a network mode other than nat-filtered."""
    if not (allow_domains or allow_cidrs or ports):
        return None
    if network != "nat-filtered":
        fail("--allow-domain, --allow-cidr and --allow-port need --network nat-filtered")
    return common_pb2.NetworkPolicy(
        allow_domains=list(allow_domains), allow_cidrs=list(allow_cidrs), ports=list(ports)
    )


def image_option() -> Callable[[F], F]:
    """`--image`: the named image a VM's workload runs in (the same help on every command)."""
    return click.option(
        "--image",
        metavar="NAME",
        default=None,
        help="Named image the program runs in (`agent-vm image list`); "
        "default: the built-in image.",
    )


def enum_word(enum: Any, value: int, prefix: str) -> str:
    """``VM_STATE_READY`` -> ``ready``: an enum value as the CLI spells it."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", "-")
    except ValueError:
        return str(value)  # a value newer than this CLI


def network_word(mode: int) -> str:
    """A network mode as `--network` takes it (``nat-filtered``, ``isolated``, ``bridge``)."""
    for word, value in NETWORKS.items():
        if value == mode:
            return word
    return "-" if mode == common_pb2.NETWORK_MODE_UNSPECIFIED else str(mode)


def human_bytes(n: int) -> str:
    """1536 -> ``1.5 KiB`` (binary units, as the profiles and `df -h` use)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def handle_errors(func: F) -> F:
    """One line per failure, exit 2; a service that is down says how to start it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            # gRPC's own words for "nothing listens there" or "the connection
            # broke" (not e.g. a service that cannot connect to libvirt: it is
            # up, and says what to do): name the service, and what to run.
            if code == grpc.StatusCode.UNAVAILABLE:
                from agentvm.cli import services as procs

                if procs.connection_failed(details):
                    fail(procs.unreachable(settings(), details, CONTACTED))
            fail(f"{code.name}: {details}")
        except AgentVMError as exc:
            fail(exc.message)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def check_timeout(timeout: float) -> None:
    if not 0 < timeout <= 86400:
        fail(f"--timeout {timeout}: use a number of seconds between 0 and 86400")


def settings() -> Settings:
    try:
        return Settings()
    except AgentVMError as exc:
        fail(exc.message)


# The services this command made channels to (name -> address): the suspects
# when a connection fails.
CONTACTED: dict[str, str] = {}


def service(address: str, name: str) -> grpc.Channel:
    """A channel to the agent-vm service ``name``: the installation's token and certificate."""
    CONTACTED[name] = address
    return Caller.of(settings()).channel(address, name)


def vm_stub() -> vm_manager_pb2_grpc.VMManagerServiceStub:
    from agentvm.v1 import vm_manager_pb2_grpc

    return vm_manager_pb2_grpc.VMManagerServiceStub(
        service(settings().vm_manager_addr, "vm-manager")
    )


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def message_dict(msg: Message) -> dict[str, Any]:
    """``msg`` as JSON-ready data, with 64-bit integers as numbers.

    (protobuf's JSON mapping writes them as strings, for JavaScript's sake; a
    command-line user piping into jq or Python wants ``"size_bytes": 1024``.)
    """
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(msg, preserving_proto_field_name=True)
    _numbers(msg, out)
    return out


def _numbers(msg: Message, out: dict[str, Any]) -> None:
    for field, value in msg.ListFields():
        key = field.name
        if key not in out:
            continue
        if field.type in _INT64_TYPES:
            if field.is_repeated:
                out[key] = [int(v) for v in out[key]]
            else:
                out[key] = int(out[key])
        elif (mtype := field.message_type) is not None and not _well_known(mtype):
            if mtype.GetOptions().map_entry:
                vfield = mtype.fields_by_name["value"]
                if vfield.type in _INT64_TYPES:
                    out[key] = {k: int(v) for k, v in out[key].items()}
                elif vfield.type == FieldDescriptor.TYPE_MESSAGE:
                    for k, v in value.items():
                        _numbers(v, out[key][str(k)])
            elif field.is_repeated:
                for sub, sub_out in zip(value, out[key], strict=True):
                    _numbers(sub, sub_out)
            else:
                _numbers(value, out[key])


def _well_known(mtype: Descriptor) -> bool:
    """Timestamp, Duration & co. keep their JSON forms (RFC 3339, "1.5s")."""
    return mtype.full_name.startswith("google.protobuf.")


def print_json(msg: Message) -> None:
    click.echo(json.dumps(message_dict(msg), indent=2))


def print_json_list(msgs: Iterable[Message]) -> None:
    """A JSON array of ``msgs`` (the `--json` of list commands)."""
    click.echo(json.dumps([message_dict(m) for m in msgs], indent=2))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Aligned columns under a header line; "(none)" when there are no rows."""
    table = [list(headers)] + [[str(c) for c in row] for row in rows]
    if len(table) == 1:
        click.echo("(none)")
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
