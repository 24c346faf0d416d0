"""A sandbox's metadata and default environment (executor/sandbox_env.py) and the
`agent-vm sandbox` option parsing."""

from __future__ import annotations

import pytest

from agentvm.cli import sandbox_cmds
from agentvm.common.errors import InvalidArgument
from agentvm.executor.sandbox_env import MAX_METADATA, SandboxEnv, check_metadata
from agentvm.v1 import executor_pb2


def env(**values: tuple[str, bool]) -> SandboxEnv:
    return SandboxEnv.from_proto(
        {k: executor_pb2.EnvValue(value=v, secret=s) for k, (v, s) in values.items()}
    )


def test_secrets_are_redacted_whole_and_never_listed() -> None:
    e = env(TOKEN=("abc123", True), LONG=("abc123-more", True), PLAIN=("abc", False))
    assert e.public() == {"PLAIN": "abc"}
    assert e.secret == {"TOKEN", "LONG"}
    # The longer secret is replaced whole, not as TOKEN + "-more".
    assert e.redact("x abc123-more y abc123 z abc") == "x [secret LONG] y [secret TOKEN] z abc"
    assert e.for_exec({"PLAIN": "own", "NEW": "1"}) == {
        "TOKEN": "abc123",
        "LONG": "abc123-more",
        "PLAIN": "own",
        "NEW": "1",
    }
    # An empty secret cannot be found in text: nothing is replaced.
    assert env(E=("", True)).redact("text") == "text"


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"1X": ("v", True)}, "env name '1X'"),
        ({"A-B": ("v", False)}, "env name 'A-B'"),
        ({"BIG": ("x" * (32 * 1024 + 1), True)}, "env['BIG'] is 32769 bytes"),
        ({"NUL": ("a\0b", True)}, "env['NUL'] holds a NUL byte"),
    ],
)
def test_bad_env_names_the_variable_not_the_value(
    values: dict[str, tuple[str, bool]], says: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        env(**values)
    assert says in err.value.message
    for value, _ in values.values():
        if len(value) > 3:
            assert value not in err.value.message


def test_metadata_rules() -> None:
    assert check_metadata({"team": "a", "k8s.io/app": "x"}) == {"team": "a", "k8s.io/app": "x"}
    with pytest.raises(InvalidArgument, match="metadata key 'a b'"):
        check_metadata({"a b": "x"})
    with pytest.raises(InvalidArgument, match=r"metadata\['k'\] is 1025 bytes"):
        check_metadata({"k": "x" * 1025})
    with pytest.raises(InvalidArgument, match=f"at most {MAX_METADATA}"):
        check_metadata({f"k{i}": "v" for i in range(MAX_METADATA + 1)})
    with pytest.raises(InvalidArgument, match="metadata filter key ''"):
        check_metadata({"": "v"}, "metadata filter")


def test_cli_durations_and_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sandbox_cmds.duration("--timeout", "90") == 90
    assert sandbox_cmds.duration("--timeout", "15m") == 900
    assert sandbox_cmds.duration("--timeout", "1.5h") == 5400
    with pytest.raises(SystemExit):
        sandbox_cmds.duration("--timeout", "soon")
    assert sandbox_cmds.pairs("--env", ("A=1", "B=x=y", "C=")) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(SystemExit):
        sandbox_cmds.pairs("--env", ("A",))
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert sandbox_cmds.secret_pairs(("MY_TOKEN", "B=inline")) == {
        "MY_TOKEN": "from-env",
        "B": "inline",
    }
