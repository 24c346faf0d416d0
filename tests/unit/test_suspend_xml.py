"""The domain definitions a resume starts with (vm_manager/suspend.py)."""

from __future__ import annotations

from agentvm.vm_manager.domain_xml import QEMU_NS
from agentvm.vm_manager.suspend import with_incoming, without_incoming

PLAIN = "<domain type='qemu'><name>agent-vm-x</name><devices/></domain>"
OTHER = (
    f"<domain xmlns:qemu='{QEMU_NS}' type='qemu'><name>x</name>"
    "<qemu:commandline><qemu:arg value='-S'/></qemu:commandline></domain>"
)


def args(xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    return [a.get("value", "") for a in root.iter(f"{{{QEMU_NS}}}arg")]


def test_incoming_is_added_once_and_removed_whole() -> None:
    once = with_incoming(PLAIN)
    assert args(once) == ["-incoming", "defer"]
    assert args(with_incoming(once)) == ["-incoming", "defer"]
    back = without_incoming(once)
    assert args(back) == []
    assert "commandline" not in back
    assert "<name>agent-vm-x</name>" in back


def test_other_qemu_arguments_are_kept() -> None:
    assert args(with_incoming(OTHER)) == ["-S", "-incoming", "defer"]
    assert args(without_incoming(with_incoming(OTHER))) == ["-S"]
    assert without_incoming(PLAIN) == PLAIN
