"""Domain XML: golden files, libvirt schema validation, libvirt's test driver, metadata.

Regenerate the golden files with ``AGENTVM_REGEN_GOLDEN=1 pytest tests/unit`` and
review the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.templates import ImageFiles, Resources, VMTemplate
from agentvm_guest.mux import PORT_NAME

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN = os.environ.get("AGENTVM_REGEN_GOLDEN") == "1"

NAME = "agent-vm-0f5a2b8e"
UUID = "0f5a2b8e-6c1d-4e7a-9b3c-2d4e6f8a0b1c"
VM_DIR = f"/var/lib/agent-vm/vms/{NAME}"
IMAGE_DIR = "/var/cache/agent-vm/images/img-20250101"
LABELS = {"team": "infra", "purpose": "golden <&> 'test'"}

COMBOS = [(p, a) for p in ResourceProfile for a in (Accel.TCG, Accel.KVM)]
COMBO_IDS = [f"{p.name.lower()}-{a.value}" for p, a in COMBOS]


def metadata(profile: ResourceProfile, labels: dict[str, str] | None = None) -> dx.Metadata:
    return dx.Metadata(
        {
            "profile": profile.name,
            "network_mode": NetworkMode.ISOLATED.name,
            "vcpus": str(profile.vcpus),
            "memory_mib": str(profile.memory_mib),
            "disk_mib": str(profile.disk_mib),
            "image_id": "img-20250101",
            "created_at": "1735689600.000",
        },
        dict(LABELS if labels is None else labels),
    )


def build(
    profile: ResourceProfile,
    accel: Accel,
    *,
    name: str = NAME,
    memory_limit: bool = True,
    vsock: bool = False,
) -> dx.Domain:
    template = VMTemplate(
        profile=profile,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources.for_profile(profile),
        accel=accel,
        image=ImageFiles(kernel=f"{IMAGE_DIR}/vmlinuz", initrd=f"{IMAGE_DIR}/initrd.img"),
        memory_limit=memory_limit,
        vsock=vsock,
    )
    return template.domain(
        name=name,
        uuid=UUID,
        overlay=f"{VM_DIR}/overlay.qcow2",
        console_log=f"{VM_DIR}/console.log",
        metadata=metadata(profile),
    )


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def attr(el: ET.Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the element at ``path`` (which must exist)."""
    found = el.find(path)
    assert found is not None, f"no {path}"
    return found.get(name)


def golden_path(profile: ResourceProfile, accel: Accel) -> Path:
    return GOLDEN_DIR / f"{profile.name.lower()}-{accel.value}.xml"


# -- golden files ---------------------------------------------------------------------------
@pytest.mark.parametrize(("profile", "accel"), COMBOS, ids=COMBO_IDS)
def test_domain_xml_matches_golden(profile: ResourceProfile, accel: Accel) -> None:
    xml = build(profile, accel).to_xml()
    path = golden_path(profile, accel)
    if REGEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(xml, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with AGENTVM_REGEN_GOLDEN=1 and review it"
    assert xml == path.read_text(encoding="utf-8")


def test_golden_files_are_all_used() -> None:
    expected = {golden_path(p, a).name for p, a in COMBOS}
    assert {p.name for p in GOLDEN_DIR.glob("*.xml")} == expected


def test_to_xml_is_deterministic() -> None:
    a = build(ResourceProfile.INTENSIVE, Accel.KVM).to_xml()
    b = build(ResourceProfile.INTENSIVE, Accel.KVM).to_xml()
    assert a == b


@pytest.mark.parametrize(("profile", "accel"), COMBOS, ids=COMBO_IDS)
def test_domain_content(profile: ResourceProfile, accel: Accel) -> None:
    """What the golden files should contain, stated independently of them."""
    root = parse(build(profile, accel).to_xml())
    assert root.get("type") == ("kvm" if accel is Accel.KVM else "qemu")
    assert root.findtext("name") == NAME
    assert root.findtext("uuid") == UUID
    assert root.findtext("memory") == str(profile.memory_mib)
    assert attr(root, "memory", "unit") == "MiB"
    assert root.findtext("vcpu") == str(profile.vcpus)
    assert root.findtext("cputune/period") == "100000"
    assert root.findtext("cputune/quota") == str(1000 * profile.cpu_quota_pct)
    overhead = 256 if accel is Accel.KVM else 1024
    assert root.findtext("memtune/hard_limit") == str((profile.memory_mib + overhead) * 1024)
    assert root.findtext("blkiotune/weight") == str(profile.blkio_weight)
    assert (root.find("cpu") is not None) == (accel is Accel.KVM)
    cmdline = root.findtext("os/cmdline") or ""
    assert f"agentvm.name={NAME}" in cmdline.split()
    assert "console=ttyS0" in cmdline.split()
    assert root.findtext("os/kernel") == f"{IMAGE_DIR}/vmlinuz"
    for tag in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(tag) == "destroy"
    devices = root.find("devices")
    assert devices is not None
    assert [d.tag for d in devices] == [
        "disk",
        "serial",
        "controller",
        "channel",
        "rng",
        "memballoon",
    ]
    assert devices.find("interface") is None  # ISOLATED: no NIC at all
    assert devices.find("vsock") is None
    assert dx.channel_state(ET.tostring(root, encoding="unicode"), PORT_NAME) == (None, None)
    assert attr(devices, "channel/target", "name") == PORT_NAME


def test_template_options() -> None:
    plain = parse(build(ResourceProfile.LIGHT, Accel.KVM, memory_limit=False).to_xml())
    assert plain.find("memtune") is None
    with_vsock = parse(build(ResourceProfile.LIGHT, Accel.KVM, vsock=True).to_xml())
    devices = with_vsock.find("devices")
    assert devices is not None
    tags = [d.tag for d in devices]
    assert tags.index("vsock") == tags.index("memballoon") - 1
    assert attr(devices, "vsock/cid", "auto") == "yes"


def test_other_elements_render() -> None:
    iface = ET.tostring(
        dx.NetworkInterface(
            "network", "agentvm-net", "52:54:00:00:00:01", "clean-traffic"
        ).to_element(),
        encoding="unicode",
    )
    assert iface == (
        '<interface type="network"><mac address="52:54:00:00:00:01" />'
        '<source network="agentvm-net" /><model type="virtio" />'
        '<filterref filter="clean-traffic"><parameter name="CTRL_IP_LEARNING" value="dhcp" />'
        "</filterref></interface>"
    )
    bridge = dx.NetworkInterface("bridge", "br0", "52:54:00:00:00:02").to_element()
    assert attr(bridge, "source", "bridge") == "br0"
    assert bridge.find("filterref") is None
    chan = dx.VirtioSerialChannel(PORT_NAME, path="/run/x.sock").to_element()
    assert attr(chan, "source", "path") == "/run/x.sock"
    assert dx.Controller("virtio-serial").to_element().attrib == {"type": "virtio-serial"}
    domain = dx.Domain(
        name="n",
        uuid=UUID,
        domain_type="qemu",
        memory_mib=128,
        vcpus=1,
        os=dx.OSBoot("/k", "/i", "c"),
        devices=(),
        emulator="/usr/bin/qemu-system-x86_64",
    )
    root = parse(domain.to_xml())
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert root.find("metadata") is None
    assert root.find("cputune") is None


# -- schema -----------------------------------------------------------------------------------
VALIDATOR = shutil.which("virt-xml-validate")


@pytest.mark.skipif(
    VALIDATOR is None, reason="virt-xml-validate (libvirt-clients) is not installed"
)
@pytest.mark.parametrize(("profile", "accel"), COMBOS, ids=COMBO_IDS)
def test_domain_xml_validates_against_libvirt_schema(
    profile: ResourceProfile, accel: Accel, tmp_path: Path
) -> None:
    assert VALIDATOR is not None
    for vsock in (False, True):
        path = tmp_path / f"domain-{vsock}.xml"
        path.write_text(build(profile, accel, vsock=vsock).to_xml(), encoding="utf-8")
        proc = subprocess.run(
            [VALIDATOR, str(path), "domain"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(
    VALIDATOR is None, reason="virt-xml-validate (libvirt-clients) is not installed"
)
def test_validator_rejects_a_broken_domain(tmp_path: Path) -> None:
    """The schema check above is not vacuous."""
    assert VALIDATOR is not None
    root = parse(build(ResourceProfile.LIGHT, Accel.TCG).to_xml())
    root.set("type", "bogus")
    path = tmp_path / "bad.xml"
    path.write_text(ET.tostring(root, encoding="unicode"), encoding="utf-8")
    proc = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, check=False)
    assert proc.returncode != 0


# -- libvirt's test driver ----------------------------------------------------------------------
@pytest.fixture
def test_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize(("profile", "accel"), COMBOS, ids=COMBO_IDS)
def test_domain_round_trip_on_libvirt_test_driver(
    test_conn: libvirt.virConnect, profile: ResourceProfile, accel: Accel
) -> None:
    name = f"agent-vm-rt-{profile.name.lower()}-{accel.value}"
    dom = test_conn.defineXML(build(profile, accel, name=name).to_xml())
    try:
        assert dom.name() == name
        assert dom.UUIDString() == UUID
        assert not dom.isActive()
        dom.create()
        assert dom.isActive()
        live = dom.XMLDesc(0)
        assert dx.Metadata.parse(live) == metadata(profile)
        root = parse(live)
        assert root.get("type") == accel.domain_type
        assert root.findtext("vcpu") == str(profile.vcpus)
        assert root.findtext("blkiotune/weight") == str(profile.blkio_weight)
        dom.destroy()
        assert not dom.isActive()
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    with pytest.raises(libvirt.libvirtError):
        test_conn.lookupByName(name)


# -- metadata ---------------------------------------------------------------------------------
def test_metadata_parse_round_trip_with_labels() -> None:
    meta = metadata(ResourceProfile.STANDARD, {"a": "1", "b/c": "", "x.y-z_w": "<&>\"'"})
    xml = dx.Domain(
        name="n",
        uuid=UUID,
        domain_type="qemu",
        memory_mib=128,
        vcpus=1,
        os=dx.OSBoot("/k", "/i", "c"),
        devices=(),
        metadata=meta,
    ).to_xml()
    assert dx.Metadata.parse(xml) == meta


XML_TEXT = st.text(
    alphabet=st.characters(
        blacklist_categories=["Cs", "Cc"], blacklist_characters=["\ufffe", "\uffff"]
    ),
    max_size=40,
)
LABEL_KEY = st.from_regex(r"\A[A-Za-z0-9_.\-/]{1,63}\Z")
FIELD_KEY = st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z").filter(lambda k: k != "label")


@given(
    fields=st.dictionaries(FIELD_KEY, XML_TEXT, max_size=6),
    labels=st.dictionaries(LABEL_KEY, XML_TEXT, max_size=6),
)
def test_metadata_round_trip_property(fields: dict[str, str], labels: dict[str, str]) -> None:
    meta = dx.Metadata(fields, labels)
    root = ET.Element("domain")
    root.append(meta.to_element())
    assert dx.Metadata.parse(ET.tostring(root, encoding="unicode")) == meta


def test_metadata_parse_absent() -> None:
    assert dx.Metadata.parse("<domain><name>x</name></domain>") is None
    other = (
        '<domain><metadata><o:vm xmlns:o="https://example.com/other">'
        "<o:profile>X</o:profile></o:vm></metadata></domain>"
    )
    assert dx.Metadata.parse(other) is None


# -- live XML helpers ---------------------------------------------------------------------------
LIVE_XML = f"""<domain type='kvm' id='7'>
  <name>{NAME}</name>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7/other.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7/{PORT_NAME}'/>
      <target type='virtio' name='{PORT_NAME}' state='connected'/>
      <alias name='channel0'/>
    </channel>
    <vsock model='virtio'>
      <cid auto='yes' address='3'/>
      <alias name='vsock0'/>
    </vsock>
  </devices>
</domain>
"""


def test_channel_state_in_live_xml() -> None:
    assert dx.channel_state(LIVE_XML, PORT_NAME) == (
        f"/var/lib/libvirt/qemu/channel/target/domain-7/{PORT_NAME}",
        "connected",
    )
    assert dx.channel_state(LIVE_XML, "org.qemu.guest_agent.0") == (
        "/var/lib/libvirt/qemu/channel/target/domain-7/other.0",
        "disconnected",
    )
    assert dx.channel_state(LIVE_XML, "org.nothing") == (None, None)


def test_channel_state_before_the_guest_connects() -> None:
    xml = f"""<domain><devices><channel type='unix'>
      <source mode='bind' path='/run/c.sock'/><target type='virtio' name='{PORT_NAME}'/>
    </channel></devices></domain>"""
    assert dx.channel_state(xml, PORT_NAME) == ("/run/c.sock", None)
    no_source = (
        f"<domain><devices><channel><target name='{PORT_NAME}'/></channel></devices></domain>"
    )
    assert dx.channel_state(no_source, PORT_NAME) == (None, None)


def test_vsock_cid_in_live_xml() -> None:
    assert dx.vsock_cid(LIVE_XML) == 3
    assert dx.vsock_cid("<domain><devices/></domain>") is None
    inactive = "<domain><devices><vsock model='virtio'><cid auto='yes'/></vsock></devices></domain>"
    assert dx.vsock_cid(inactive) is None
