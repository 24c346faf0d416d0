"""What every `agent-vm` command shares: one-line errors, settings, channels to the services."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.grpc_util import Caller
from agentvm.v1 import common_pb2, vm_manager_pb2_grpc

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


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"agent-vm: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error (bad option value, unknown command) as one line, exit 2."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # the help text itself
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "agent-vm"
        fail(f"{exc.format_message()} (see `{where} --help`)")


class Group(click.Group):
    """The `agent-vm` group: usage errors anywhere below it are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)


def handle_errors(func: F) -> F:
    """One line per failure, exit 2; a service that is down says how to start it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            # gRPC's own words for "nothing listens there" (not e.g. a service
            # that cannot connect to libvirt: it is up, and says what to do).
            if code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect"):
                fail(
                    f"an agent-vm service is not reachable ({details}): "
                    "start the services with `agent-vm up`"
                )
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


def service(address: str, name: str) -> grpc.Channel:
    """A channel to the agent-vm service ``name``: the installation's token and certificate."""
    return Caller.of(settings()).channel(address, name)


def vm_stub() -> vm_manager_pb2_grpc.VMManagerServiceStub:
    return vm_manager_pb2_grpc.VMManagerServiceStub(
        service(settings().vm_manager_addr, "vm-manager")
    )


def print_json(msg: Any) -> None:
    click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))
