"""The Python client's ``image=`` (issue 15): checked before anything is sent, and
carried in SandboxSpec.image by create() and run()."""

from __future__ import annotations

from typing import Any

import pytest

import agent_vm
from agent_vm import _calls
from agentvm.v1 import common_pb2

NOWHERE = "unix:/nonexistent/agent-vm.sock"
# Values of the wrong type, as a caller without type checking might pass them.
NUMBER: Any = 3
BYTES: Any = b"x"


def spec_of(image: object) -> Any:
    return _calls.spec("standard", "isolated", 0, 0, None, "auto", None, None, None, image)  # type: ignore[arg-type]


def test_the_image_is_carried_in_the_spec() -> None:
    assert spec_of("coder:1").image == "coder:1"
    assert spec_of(None).image == ""
    assert spec_of("default").image == "default"  # the executor reads it as the built-in
    assert spec_of("coder").network_mode == common_pb2.NETWORK_MODE_ISOLATED


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: agent_vm.Sandbox.create(image=NUMBER, address=NOWHERE), "type", ["image", "str"]),
        (lambda: agent_vm.run("true", image=BYTES, address=NOWHERE), "type", ["image", "bytes"]),
        (lambda: agent_vm.run("true", image="co der", address=NOWHERE), "value", ["no spaces"]),
        (lambda: agent_vm.Sandbox.create(image=" x", address=NOWHERE), "value", ["image="]),
    ],
)
def test_a_bad_image_fails_before_any_call(call: Any, error: str, words: list[str]) -> None:
    expected = agent_vm.ArgumentTypeError if error == "type" else agent_vm.InvalidArgumentError
    with pytest.raises(expected) as info:
        call()
    for word in words:
        assert word in info.value.message, info.value.message


def test_create_and_run_document_the_image_and_what_it_raises() -> None:
    for func in (agent_vm.AsyncSandbox.create, agent_vm.arun):
        doc = func.__doc__ or ""
        assert "``image``" in doc
        assert "NotFoundError when there is no such image" in doc
