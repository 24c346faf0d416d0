"""A sandbox's metadata and default environment, and keeping its secrets out of
everything but its programs (docs/SANDBOXES.md, section 1)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agentvm.common.errors import InvalidArgument
from agentvm.v1 import executor_pb2

MAX_METADATA = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
METADATA_KEY = re.compile(r"[A-Za-z0-9._/-]{1,128}")
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


def _shown(text: str) -> str:
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def check_metadata(metadata: Mapping[str, str], what: str = "metadata") -> dict[str, str]:
    """The caller's metadata, or INVALID_ARGUMENT naming the key and the rule."""
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(f"{what} has {len(metadata)} keys; at most {MAX_METADATA}")
    for key, value in metadata.items():
        if not METADATA_KEY.fullmatch(key):
            raise InvalidArgument(
                f"{what} key {_shown(key)}: expected 1-{MAX_METADATA_KEY} of A-Z a-z 0-9 . _ / -"
            )
        if len(value.encode()) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                f"{what}[{key!r}] is {len(value.encode())} bytes; at most {MAX_METADATA_VALUE}"
            )
    return dict(metadata)


@dataclass(frozen=True)
class SandboxEnv:
    """The default environment; ``secret`` holds the names whose values are secret."""

    values: dict[str, str] = field(default_factory=dict)
    secret: frozenset[str] = frozenset()

    @classmethod
    def from_proto(cls, env: Mapping[str, executor_pb2.EnvValue]) -> SandboxEnv:
        """Checked: INVALID_ARGUMENT names the variable, never its value."""
        if len(env) > MAX_ENV:
            raise InvalidArgument(f"env has {len(env)} variables; at most {MAX_ENV}")
        for name, ev in env.items():
            if not ENV_NAME.fullmatch(name):
                raise InvalidArgument(
                    f"env name {_shown(name)}: expected a variable name "
                    "(A-Z a-z 0-9 _, not starting with a digit)"
                )
            if len(ev.value.encode()) > MAX_ENV_VALUE:
                raise InvalidArgument(
                    f"env[{name!r}] is {len(ev.value.encode())} bytes; at most {MAX_ENV_VALUE}"
                )
            if "\0" in ev.value:
                raise InvalidArgument(f"env[{name!r}] holds a NUL byte, which no variable can")
        return cls(
            values={k: v.value for k, v in env.items()},
            secret=frozenset(k for k, v in env.items() if v.secret),
        )

    def for_exec(self, own: Mapping[str, str]) -> dict[str, str]:
        """An Exec's environment: the default one under the Exec's own."""
        return {**self.values, **own}

    def public(self) -> dict[str, str]:
        return {k: v for k, v in self.values.items() if k not in self.secret}

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``[secret NAME]`` (longest first,
        so a secret that contains another is replaced whole)."""
        pairs = sorted(
            ((self.values[n], n) for n in self.secret if self.values[n]),
            key=lambda p: -len(p[0]),
        )
        for value, name in pairs:
            text = text.replace(value, f"[secret {name}]")
        return text
