"""Building named images from specs in tests, as the CLI sends them (whole, with their files)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from agentvm.common import image_spec
from agentvm.v1 import vm_manager_pb2
from tests.vmharness import REPO, VMManagerProcess

CODER_SPEC = REPO / "images" / "coder.toml"
BUILD_TIMEOUT_S = 1800.0


@dataclass
class Built:
    image: vm_manager_pb2.Image | None = None
    lines: list[str] = field(default_factory=list)
    progress: list[vm_manager_pb2.ImageProgress] = field(default_factory=list)

    def cached(self, phase: str) -> bool:
        """Whether the last progress event of ``phase`` says it came from the cache."""
        marks = [p.cached for p in self.progress if p.phase == phase]
        assert marks, f"no progress for {phase!r}: {[p.phase for p in self.progress]}"
        return marks[-1]


def spec_source(path: Path, toml: str | None = None) -> vm_manager_pb2.ImageSpecSource:
    """The spec and every file its [[files]] name, relative to its directory."""
    text = path.read_text() if toml is None else toml
    spec = image_spec.parse(text, path)
    files = [
        vm_manager_pb2.SpecFile(
            path=copy.src.relative_to(path.parent.resolve()).as_posix(),
            content=copy.src.read_bytes(),
            mode=copy.src.stat().st_mode & 0o777,
        )
        for copy in spec.files
    ]
    return vm_manager_pb2.ImageSpecSource(toml=text, filename=path.name, files=files)


def build(vmm: VMManagerProcess, source: vm_manager_pb2.ImageSpecSource, name: str = "") -> Built:
    out = Built()
    req = vm_manager_pb2.BuildImageRequest(spec=source, name=name)
    for ev in vmm.stub().BuildImage(req, timeout=BUILD_TIMEOUT_S):
        if ev.HasField("log_line"):
            out.lines.append(ev.log_line)
            sys.stderr.write(f"[build] {ev.log_line}\n")
        elif ev.HasField("progress"):
            out.progress.append(ev.progress)
        else:
            out.image = ev.image
    return out
