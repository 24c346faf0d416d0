"""What every call shares: the channel, error translation, and the checks that
turn a caller's arguments into messages (wrong types and values are refused
here, naming the argument, before anything is sent)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc

from agent_vm._types import (
    NETWORKS,
    PROFILES,
    WORKSPACES,
    Callback,
    CommandResult,
    Network,
    NetworkPolicy,
    Profile,
    Workspace,
)
from agent_vm.errors import (
    ArgumentTypeError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    from_rpc,
)
from agentvm.common import tls
from agentvm.common.auth import aio_token_interceptors, client_token
from agentvm.common.config import DEFAULT_TLS_DIR
from agentvm.common.reconnect import RECONNECT_OPTIONS, Reconnect
from agentvm.v1 import common_pb2, executor_pb2

DEFAULT_ADDRESS = "unix:/run/agent-vm/executor.sock"
T = TypeVar("T")
P = ParamSpec("P")


def default_address() -> str:
    """AGENTVM_EXECUTOR_ADDR, or the installation's executor socket."""
    return os.environ.get("AGENTVM_EXECUTOR_ADDR", DEFAULT_ADDRESS)


def _trace_interceptors() -> list[Any] | None:
    """OpenTelemetry client interceptors when the caller's process set up tracing.

    The calls then become client spans under the caller's current span, and the
    trace continues through every agent-vm service.
    """
    if "opentelemetry.trace" not in sys.modules:
        return None  # nothing here set up tracing: no need to import it (tens of ms)
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    return list(aio_client_interceptors(tracer_provider=provider))  # type: ignore[no-untyped-call]


def channel(address: str) -> grpc.aio.Channel:
    """A channel to the executor, sending the installation's token (AGENTVM_TOKEN or
    AGENTVM_TOKEN_FILE) when this process has one, over mutual TLS with the
    installation's client certificate unless AGENTVM_TLS=off (AGENTVM_TLS_DIR, or
    AGENTVM_TLS_CA/CERT/KEY). Once this process has reached the executor, calls
    wait for an executor that is restarting (:mod:`agentvm.common.reconnect`)."""
    text("address", address)
    reconnect = Reconnect(address)  # outermost: the time it waits comes off the deadline
    interceptors: list[Any] = [reconnect, *(_trace_interceptors() or ())]
    token = client_token()
    if token is not None:
        interceptors += aio_token_interceptors(token)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
        ("grpc.enable_http_proxy", 0),
        *RECONNECT_OPTIONS,
    ]
    try:
        files = tls.for_identity(
            os.environ.get("AGENTVM_TLS", "mutual"),
            Path(os.environ.get("AGENTVM_TLS_DIR", DEFAULT_TLS_DIR)),
            tls.CLIENT,
        )
        credentials = None if files is None else tls.channel_credentials(files)
    except tls.TLSError as exc:
        raise FailedPreconditionError(str(exc)) from None
    if credentials is None:
        chan = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    else:
        chan = grpc.aio.secure_channel(
            address,
            credentials,
            options=[*options, *tls.target_options("executor")],
            interceptors=interceptors,
        )
    reconnect.bind(chan)
    return chan


def translate(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Translate gRPC errors of an async method into AgentVMError subclasses."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, getattr(args[0], "_address", DEFAULT_ADDRESS)) from exc

    return wrapper


# -- argument checks -------------------------------------------------------------
def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong(name: str, expected: str, value: object) -> ArgumentTypeError:
    return ArgumentTypeError(
        f"{name} must be {expected}, got {type(value).__name__} {_shown(value)}"
    )


def text(name: str, value: object) -> str:
    """``value`` if it is a str, else ArgumentTypeError naming ``name``."""
    if not isinstance(value, str):
        raise _wrong(name, "a str", value)
    return value


def data(name: str, value: object) -> bytes:
    """bytes of a bytes-like or str ``value`` (str is UTF-8 encoded)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise _wrong(name, "bytes or str", value)


def count(name: str, value: object) -> int:
    """A non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an int", value)
    if value < 0:
        raise InvalidArgumentError(f"{name} must be 0 or more, got {value}")
    return value


def seconds(name: str, value: object) -> float:
    """A positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(name, "a number of seconds (int or float)", value)
    if not value > 0:
        raise InvalidArgumentError(f"{name} must be more than 0 seconds, got {value}")
    return float(value)


def str_map(name: str, value: object) -> dict[str, str]:
    """A mapping of str to str (None: empty), checked key by key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _wrong(name, "a mapping of str to str (e.g. {'KEY': 'value'})", value)
    for key, item in value.items():
        if not isinstance(key, str):
            raise _wrong(f"each key of {name}", "a str", key)
        if not isinstance(item, str):
            raise ArgumentTypeError(
                f"{name}[{key!r}] must be a str, got {type(item).__name__} {_shown(item)} "
                f"(convert it: {name}={{{key!r}: {str(item)!r}}})"
            )
    return dict(value)


def sandbox_env(envs: object, secret_envs: object) -> dict[str, executor_pb2.EnvValue]:
    """CreateSandboxRequest.env of ``envs`` and ``secret_envs`` (checked here; an error
    about a secret names the variable, never its value)."""
    out = {k: executor_pb2.EnvValue(value=v) for k, v in str_map("envs", envs).items()}
    if secret_envs is None:
        return out
    if not isinstance(secret_envs, Mapping):
        raise ArgumentTypeError(
            f"secret_envs must be a mapping of str to str, got {type(secret_envs).__name__}"
        )
    for key, item in secret_envs.items():
        if not isinstance(key, str):
            raise ArgumentTypeError(
                f"each key of secret_envs must be a str, got {type(key).__name__}"
            )
        if not isinstance(item, str):
            raise ArgumentTypeError(
                f"secret_envs[{key!r}] must be a str, got {type(item).__name__}"
            )
        if key in out:
            raise InvalidArgumentError(
                f"{key!r} is in both envs and secret_envs: give it in one of them"
            )
        out[key] = executor_pb2.EnvValue(value=item, secret=True)
    return out


def str_list(name: str, value: object) -> list[str]:
    """A sequence of str (a single str is refused: it is not a list of arguments)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        hint = f" (e.g. {name}=[{value!r}])" if isinstance(value, str) else ""
        raise ArgumentTypeError(
            f"{name} must be a list of str, got {type(value).__name__} {_shown(value)}{hint}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong(f"{name}[{i}]", "a str", item)
    return list(value)


def image_name(value: object) -> str:
    """None or a named image's name, "name:tag" or id (`agent-vm image list`); "" and
    "default" are the built-in image. Whether it exists is the server's to say."""
    if value is None:
        return ""
    image = text("image", value)
    if image.strip() != image or any(c.isspace() or ord(c) < 0x20 for c in image):
        raise InvalidArgumentError(
            f"image={image!r}: an image name, name:tag or id as `agent-vm image list` "
            "shows it (no spaces)"
        )
    return image


def callback(name: str, value: object) -> Callback | None:
    """None or a callable taking one str."""
    if value is not None and not callable(value):
        raise _wrong(name, "a callable taking one str, or None", value)
    return value


def local_file(local: str | os.PathLike[str]) -> Path:
    """``local`` as a Path; NotFoundError before anything is sent when it is no file."""
    if not isinstance(local, (str, os.PathLike)):
        raise _wrong("local", "a str or path", local)
    src = Path(local)
    if not src.is_file():
        raise NotFoundError(f"local file {src} does not exist: pass the path of an existing file")
    return src


def program(
    cmd: str | Sequence[str] | None,
    code: str | None,
    language: str,
    args: Sequence[str],
    *,
    image_default: bool = False,
) -> common_pb2.Program:
    """The Program of ``cmd`` (shell string or argv) or ``code`` in ``language``; with
    ``image_default`` and neither, an empty one (the image's default command)."""
    if image_default and cmd is None and code is None:
        if args:
            raise InvalidArgumentError(
                "args without cmd or code: the image's default command takes none; "
                "give cmd= with the full command instead"
            )
        return common_pb2.Program()
    if (cmd is None) == (code is None):
        raise InvalidArgumentError(
            "give either a command (a shell string or an argv list) or code=, not "
            + ("both" if cmd is not None else "neither")
        )
    extra = str_list("args", args)
    if code is not None:
        text("code", code)
        lang = {
            "python": common_pb2.CODE_LANGUAGE_PYTHON,
            "shell": common_pb2.CODE_LANGUAGE_SHELL,
        }.get(text("language", language))
        if lang is None:
            raise InvalidArgumentError(f"language={language!r}: use 'python' or 'shell'")
        return common_pb2.Program(code=common_pb2.Code(language=lang, source=code, args=extra))
    if isinstance(cmd, str):
        return common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_SHELL, source=cmd, args=extra)
        )
    argv = str_list("cmd", cmd)
    if not argv:
        raise InvalidArgumentError("cmd is an empty list: give the program and its arguments")
    return common_pb2.Program(argv=common_pb2.Argv(args=[*argv, *extra]))


def network_policy(
    value: object, expected: str = "an agent_vm.NetworkPolicy"
) -> common_pb2.NetworkPolicy:
    """The message of a ``policy`` argument; ArgumentTypeError for anything else."""
    if not isinstance(value, NetworkPolicy):
        raise _wrong("policy", expected, value)
    return value.to_proto()


def spec(
    profile: Profile,
    network: Network,
    cpus: int,
    memory_mib: int,
    lifetime: float | None,
    workspace: Workspace,
    labels: Mapping[str, str] | None,
    policy: NetworkPolicy | None = None,
    bridge: str | None = None,
    image: str | None = None,
) -> executor_pb2.SandboxSpec:
    """The SandboxSpec of create()/run() arguments (checked here)."""
    for name, value, table in (
        ("profile", profile, PROFILES),
        ("network", network, NETWORKS),
        ("workspace", workspace, WORKSPACES),
    ):
        if value not in table:
            raise InvalidArgumentError(f"{name}={value!r}: use one of {', '.join(table)}")
    if policy is not None:
        network_policy(policy, "an agent_vm.NetworkPolicy or None")
    if policy is not None and network != "nat-filtered":
        raise InvalidArgumentError(
            f"a network policy needs network='nat-filtered', not {network!r}"
        )
    if bridge is not None:
        text("bridge", bridge)
        if network != "bridge":
            raise InvalidArgumentError(
                f"bridge={bridge!r} needs network='bridge' (it names the host bridge "
                f"a bridge-mode sandbox is attached to), not network={network!r}"
            )
    if network == "bridge" and not bridge:
        raise InvalidArgumentError(
            "network='bridge' needs bridge='NAME': the name of an existing host bridge "
            "(e.g. bridge='br0'; `ip link show type bridge` lists them)"
        )
    out = executor_pb2.SandboxSpec(
        profile=PROFILES[profile],
        network_mode=NETWORKS[network],
        network_policy=policy.to_proto() if policy is not None else None,
        resources=common_pb2.Resources(
            vcpus=count("cpus", cpus), memory_mib=count("memory_mib", memory_mib)
        ),
        workspace_mode=WORKSPACES[workspace],
        labels=str_map("labels", labels),
        bridge=bridge or "",
        image=image_name(image),
    )
    if lifetime is not None:
        out.lifetime.FromNanoseconds(int(seconds("lifetime", lifetime) * 1e9))
    return out


class Output:
    """Collects a command's output and feeds the callbacks."""

    def __init__(self, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._cb = {
            common_pb2.OUTPUT_STREAM_STDOUT: callback("on_stdout", on_stdout),
            common_pb2.OUTPUT_STREAM_STDERR: callback("on_stderr", on_stderr),
        }

    def add(self, chunk: common_pb2.OutputChunk) -> None:
        """Keep a chunk and hand it to its stream's callback."""
        (self.out if chunk.stream == common_pb2.OUTPUT_STREAM_STDOUT else self.err).extend(
            chunk.data
        )
        cb = self._cb.get(chunk.stream)
        if cb is not None:
            cb(chunk.data.decode("utf-8", "replace"))

    def result(self, status: common_pb2.ExitStatus, exec_id: str = "") -> CommandResult:
        """The CommandResult of the exit status and what was collected."""
        return CommandResult(
            exit_code=status.exit_code,
            stdout_bytes=bytes(self.out),
            stderr_bytes=bytes(self.err),
            timed_out=status.timed_out,
            duration_s=status.duration.ToNanoseconds() / 1e9,
            signal=status.signal,
            stdout_truncated=status.stdout_truncated,
            stderr_truncated=status.stderr_truncated,
            exec_id=exec_id,
        )
