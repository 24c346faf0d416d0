"""scripts/api_docs.py: the gRPC reference is rendered from the protos' comments,
and an element without one is named (so test.sh fails on it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.vmharness import REPO

PROTO = """syntax = "proto3";
package agentvm.v1;

// Says hello.
service Greeter {
  // One greeting.
  rpc Hello(HelloRequest) returns (stream HelloResponse);
  rpc Quiet(HelloRequest) returns (HelloResponse);
}

// Whom to greet.
message HelloRequest {
  // Their name.
  string name = 1;
  map<string, string> tags = 2;
}

// A greeting.
message HelloResponse {
  // The text | with a pipe.
  string text = 1;
  Mood mood = 2;
}

// How it is said.
enum Mood {
  // Not said.
  MOOD_UNSPECIFIED = 0;
  MOOD_HAPPY = 1;
}
"""


def test_the_reference_shows_the_comments_and_names_what_has_none(tmp_path: Path) -> None:
    src = tmp_path / "agentvm" / "v1"
    src.mkdir(parents=True)
    (src / "greeter.proto").write_text(PROTO)
    desc = tmp_path / "desc.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            "--include_source_info",
            f"--descriptor_set_out={desc}",
            "agentvm/v1/greeter.proto",
        ],
        check=True,
    )
    out = tmp_path / "api" / "grpc.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "api_docs.py"), str(desc), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    missing = [line.strip() for line in proc.stderr.splitlines()[1:]]
    assert missing == [
        "agentvm/v1/greeter.proto: Greeter.Quiet",
        "agentvm/v1/greeter.proto: HelloRequest.tags",
        "agentvm/v1/greeter.proto: HelloResponse.mood",
        "agentvm/v1/greeter.proto: Mood.MOOD_HAPPY",
    ]
    md = out.read_text()
    assert (
        "| Hello | [HelloRequest](#agentvm-v1-hellorequest) | "
        "stream [HelloResponse](#agentvm-v1-helloresponse) | One greeting. |"
    ) in md
    assert "| tags = 2 | map<string, string> |  |" in md
    assert "| text = 1 | string | The text \\| with a pipe. |" in md
    assert "| mood = 2 | [Mood](#agentvm-v1-mood) |  |" in md
    assert "| MOOD_UNSPECIFIED | 0 | Not said. |" in md


def test_the_python_client_is_all_documented() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "api_docs_python.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
