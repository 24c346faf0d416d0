"""OCI images made by the tools users use (umoci, skopeo), read and applied end to end.

A busybox root without Python becomes an OCI layout with umoci (two layers:
the second deletes a file, which umoci writes as a whiteout), then an
oci-archive and a docker-archive with skopeo. Each is read and verified by
the host half (vm_manager/oci.py) and applied by the guest half
(agentvm_guest/layers.py) into a fresh root, where the image's own shell
runs (chroot).
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path

import pytest

from agentvm.vm_manager import oci, oci_scan
from agentvm_guest.layers import apply_layer
from tests.ociimages import BUSYBOX, busybox_image


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same image as an OCI layout, an oci-archive and a docker-archive."""
    return busybox_image(tmp_path_factory.mktemp("oci-tools"))


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_real_archives_are_read_verified_and_applied(
    refs: dict[str, str], kind: str, tmp_path: Path
) -> None:
    with oci.open_image(refs[kind]) as image:
        assert "GREETING=hello world" in image.config.env
        assert image.config.workdir == "/home/app"
        assert image.config.user == "app"
        assert image.config.entrypoint == ("/bin/sh",)
        assert image.config.cmd == ("-c", "echo $GREETING")
        assert image.config.labels["org.example.team"] == "agents"
        # docker-archive keeps skopeo's tag as the image's name; an OCI ref.name of
        # "t" is a bare tag, not a name.
        assert image.name == ("example:t" if kind == "docker-archive" else "")
        scans = oci_scan.scan_all(image)
        assert len(scans) == 2
        assert scans[1].whiteouts == 1  # etc/secret
        root = tmp_path / "root"
        root.mkdir()
        for i in range(len(image.layers)):
            with image.open_layer(i) as stream:
                apply_layer(stream, str(root))
    assert _sha(root / "bin" / "busybox") == _sha(BUSYBOX)
    assert not (root / "etc" / "secret").exists()
    assert (root / "home" / "app" / "notes").read_text() == "upper layer\n"
    # The image's own shell runs in its root (it has no Python, no libc: a static busybox).
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo $((6 * 7)); ls /etc"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert out == ["42", "group", "passwd"]


def test_a_real_archive_with_one_flipped_byte_is_refused(
    refs: dict[str, str], tmp_path: Path
) -> None:
    src = Path(refs["oci-archive"].split(":", 1)[1])
    data = bytearray(src.read_bytes())
    # Flip a byte in the middle of the largest blob (the busybox layer).
    with tarfile.open(src) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
    data[big.offset_data + big.size // 2] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with oci.open_image(f"oci-archive:{bad}") as image, pytest.raises(oci.ImageArchiveError) as err:
        oci_scan.scan_all(image)
    assert "layer 1 of 2" in str(err.value)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
