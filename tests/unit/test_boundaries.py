"""Services share code only through agentvm.common and talk only through the protos.

Each host service is its own process; importing another service's package
would tie their releases together and hide a contract that belongs in
protos/. The guest package is allowed: it is the guest side of the
host <-> guest wire contract (mux framing, workspace paths).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = ("vm_manager", "pool_manager", "executor", "monitor", "e2b_gateway")
ROOT = Path(__file__).resolve().parents[2] / "services" / "agentvm"


def _agentvm_imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "agentvm"]


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_only_itself_common_and_protos(service: str) -> None:
    allowed = {service, "common", "v1"}
    files = sorted((ROOT / service).rglob("*.py"))
    assert files, f"no sources under {ROOT / service}"
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in files
        for line, name in _agentvm_imports(path)
        if len(name.split(".")) < 2 or name.split(".")[1] not in allowed
    ]
    assert not bad, "move what is shared to agentvm.common:\n" + "\n".join(bad)
