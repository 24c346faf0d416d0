"""OCI and Docker archives: read, verify and refuse what could escape (vm_manager/oci.py).

The archives are made here byte by byte to the OCI image layout and `docker
save` formats, so each hostile variant (a truncated blob, a digest that does
not match, a path that leaves the root) differs from a good archive in
exactly one thing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agentvm.vm_manager import oci, oci_scan
from tests.ociimages import BASE_LAYER, CONFIG, Entry, Layout, config_doc, make_layer


def docker_archive(path: Path, layers: list[bytes], config: dict[str, Any] | None = None) -> Path:
    cfg = json.dumps(config or config_doc(layers)).encode()
    cfg_name = f"{hashlib.sha256(cfg).hexdigest()}.json"
    members: dict[str, bytes] = {cfg_name: cfg}
    names = []
    for i, layer in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        members[name] = layer
        names.append(name)
    members["manifest.json"] = json.dumps(
        [{"Config": cfg_name, "RepoTags": ["example:latest"], "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


BASE = BASE_LAYER
UPPER = make_layer(
    [
        ("etc/.wh.secret", "file", ""),
        ("opt/old/.wh..wh..opq", "file", ""),
        ("home/app/notes", "file", "upper"),
    ]
)


def scan(ref: str, **kw: Any) -> tuple[oci.Image, list[oci_scan.LayerScan]]:
    with oci.open_image(ref) as image:
        return image, oci_scan.scan_all(image, **kw)


@pytest.mark.parametrize("compress", [False, True])
def test_oci_archive_and_layout_dir_read_config_and_verify_layers(
    tmp_path: Path, compress: bool
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE, UPPER], compress=compress)
    archive = layout.pack(tmp_path / "image.tar")
    for ref in (f"oci-archive:{archive}", f"oci:{layout.root}", f"oci:{layout.root}:latest"):
        image, scans = scan(ref)
        assert image.config.env == ("PATH=/usr/bin:/bin", "GREETING=hello world")
        assert image.config.workdir == "/home/app"
        assert image.config.user == "app"
        assert image.config.entrypoint == ("/bin/sh", "-c")
        assert image.config.cmd == ("echo hi",)
        assert image.config.labels == {"org.example.team": "agents"}
        assert [s.entries for s in scans] == [9, 3]
        assert [s.whiteouts for s in scans] == [0, 2]
        assert scans[0].uncompressed_bytes == len(BASE)


def test_docker_archive_is_read_and_verified_by_diff_ids(tmp_path: Path) -> None:
    image, scans = scan(f"docker-archive:{docker_archive(tmp_path / 'd.tar', [BASE, UPPER])}")
    assert image.config.user == "app"
    assert len(scans) == 2
    assert image.name == "example:latest"  # its RepoTags


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("docker.io/library/busybox:1.36", "busybox:1.36"),
        ("localhost/my-agent", "my-agent"),
        ("ghcr.io/org/tool:v1@sha256:" + "a" * 64, "tool:v1"),
        ("Upper/Case:Tag", ""),
        ("latest:", ""),
        ("", ""),
        (["not", "a", "string"], ""),
        ("x" * 600, ""),
    ],
)
def test_an_archives_own_name_is_shortened_or_dropped(reference: object, name: str) -> None:
    assert oci.short_name(reference) == name


def test_a_tag_chooses_the_image_and_an_unknown_tag_says_so(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE], tag="one")
    layout.image([BASE, UPPER], tag="two")
    with oci.open_image(f"oci:{layout.root}:two") as image:
        assert len(image.layers) == 2
    with pytest.raises(oci.ImageArchiveError, match="holds 2 images: name one with oci:DIR:TAG"):
        oci.open_image(f"oci:{layout.root}")
    with pytest.raises(oci.ImageArchiveError, match="no image tagged 'three'"):
        oci.open_image(f"oci:{layout.root}:three")


@pytest.mark.parametrize(
    "ref",
    ["", "docker://busybox", "oci-archive:", "podman:x", "busybox:latest"],
)
def test_bad_references_name_the_accepted_forms(ref: str) -> None:
    with pytest.raises(oci.ImageArchiveError, match="oci-archive:PATH") as err:
        oci.parse_ref(ref)
    assert repr(ref) in str(err.value)


def test_missing_files_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(oci.ImageArchiveError, match="no such file"):
        oci.open_image(f"oci-archive:{tmp_path / 'nope.tar'}")
    with pytest.raises(oci.ImageArchiveError, match=r"has no index\.json"):
        oci.open_image(f"oci:{tmp_path}")


def test_a_truncated_archive_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE, UPPER], compress=True)
    packed = layout.pack(tmp_path / "image.tar")
    data = packed.read_bytes()
    with tarfile.open(packed) as tar:
        last = max(tar.getmembers(), key=lambda m: m.offset_data + m.size)
    # Cut inside the headers, and inside the last blob's data (tar's zero padding at the
    # end of a record is not content: cutting only that loses nothing).
    for cut in (len(data) // 3, last.offset_data + last.size // 2):
        short = tmp_path / f"short-{cut}.tar"
        short.write_bytes(data[:cut])
        with pytest.raises(oci.ImageArchiveError, match=r"save the image again|incomplete"):
            scan(f"oci-archive:{short}")


def test_a_layer_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    manifest = layout.image([BASE, UPPER])
    blob = layout.root / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    altered = bytearray(blob.read_bytes())
    altered[600] ^= 0x01  # inside the first file's data: still a valid tar
    blob.write_bytes(bytes(altered))
    with pytest.raises(oci.ImageArchiveError, match=r"layer 2 of 2 .* does not match its digest"):
        scan(f"oci:{layout.root}")


def test_a_layer_whose_content_does_not_match_the_config_is_refused(tmp_path: Path) -> None:
    # A consistent blob digest, but the config's diff_id names other content (docker-archive
    # has only diff_ids to check against).
    other = make_layer([("x", "file", "other")])
    path = docker_archive(tmp_path / "d.tar", [BASE], config_doc([other]))
    with pytest.raises(oci.ImageArchiveError, match="does not match the config's diff_id"):
        scan(f"docker-archive:{path}")


def test_a_config_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    manifest = layout.image([BASE])
    cfg = layout.root / "blobs" / "sha256" / manifest["config"]["digest"][7:]
    cfg.write_bytes(cfg.read_bytes().replace(b'"app"', b'"root"'))
    with pytest.raises(oci.ImageArchiveError, match=r"config .* does not match its digest"):
        oci.open_image(f"oci:{layout.root}")


def test_a_declared_size_that_is_wrong_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")

    def grow(m: dict[str, Any]) -> None:
        m["layers"][0]["size"] += 1

    layout.image([BASE], mutate=grow)
    with pytest.raises(oci.ImageArchiveError, match="its manifest says"):
        scan(f"oci:{layout.root}")


HOSTILE = [
    ([("../escape", "file", "x")], "leaves the image's root"),
    ([("etc/../../escape", "file", "x")], "leaves the image's root"),
    ([("/etc/passwd", "file", "x")], "an absolute path"),
    ([("dev/mem", "chr", "")], "a device node"),
    ([("dev/sda", "blk", "")], "a device node"),
    ([("passwd", "hardlink", "/etc/passwd")], "outside the image"),
    ([("passwd", "hardlink", "../../etc/shadow")], "outside the image"),
    ([("passwd", "hardlink", "etc/not-there")], "not a file of the image"),
    ([("x" * 5000, "file", "x")], "over 4096 bytes"),
    ([("etc/.wh.", "file", "")], "a whiteout of nothing"),
]


@pytest.mark.parametrize(("entries", "why"), HOSTILE, ids=[w for _, w in HOSTILE])
def test_hostile_entries_are_refused_naming_layer_and_entry(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE, make_layer(entries)])
    with pytest.raises(oci.ImageArchiveError) as err:
        scan(f"oci:{layout.root}")
    assert why in str(err.value)
    assert "layer 2 of 2" in str(err.value)
    assert repr(entries[0][0][:200]) in str(err.value)


def test_a_hard_link_to_a_whited_out_file_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    third = make_layer([("keep", "hardlink", "etc/secret")])
    layout.image([BASE, UPPER, third])
    with pytest.raises(oci.ImageArchiveError, match="'etc/secret', which is not a file"):
        scan(f"oci:{layout.root}")
    # ... and one under an opaque directory too; a file of a lower layer is fine.
    layout2 = Layout(tmp_path / "layout2")
    layout2.image([BASE, UPPER, make_layer([("keep", "hardlink", "opt/old/a")])])
    with pytest.raises(oci.ImageArchiveError, match="'opt/old/a', which is not a file"):
        scan(f"oci:{layout2.root}")
    layout3 = Layout(tmp_path / "layout3")
    layout3.image([BASE, UPPER, make_layer([("keep", "hardlink", "bin/busybox")])])
    scan(f"oci:{layout3.root}")


def test_caps_on_entries_and_size(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE])
    with pytest.raises(oci.ImageArchiveError, match="more than 3 files"):
        scan(f"oci:{layout.root}", max_entries=3)
    with pytest.raises(oci.ImageArchiveError, match="over 10 bytes uncompressed"):
        scan(f"oci:{layout.root}", max_bytes=10)


def test_zstd_layers_and_foreign_architectures_say_what_to_do(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")

    def zstd(m: dict[str, Any]) -> None:
        m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"

    layout.image([BASE], mutate=zstd)
    with pytest.raises(oci.ImageArchiveError, match=r"zstd-compressed.*gzip layers"):
        oci.open_image(f"oci:{layout.root}")
    arm = Layout(tmp_path / "arm")
    arm.image([BASE], config=config_doc([BASE], architecture="arm64"))
    with pytest.raises(oci.ImageArchiveError, match=r"linux/arm64.*linux/amd64"):
        oci.open_image(f"oci:{arm.root}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("Env", "PATH=/bin"),
        ("Env", ["NOEQUALS"]),
        ("Entrypoint", [1, 2]),
        ("WorkingDir", ["/"]),
        ("Labels", {"a": 1}),
    ],
)
def test_a_config_of_the_wrong_shape_is_refused(tmp_path: Path, field: str, value: Any) -> None:
    layout = Layout(tmp_path / "layout")
    layout.image([BASE], config=config_doc([BASE], config={**CONFIG, field: value}))
    with pytest.raises(oci.ImageArchiveError, match=field):
        oci.open_image(f"oci:{layout.root}")


def test_docker_archive_paths_may_not_leave_the_archive(tmp_path: Path) -> None:
    path = tmp_path / "d.tar"
    manifest = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    with pytest.raises(oci.ImageArchiveError, match="outside the archive"):
        oci.open_image(f"docker-archive:{path}")


def test_a_file_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(oci.ImageArchiveError, match="not a readable tar archive"):
        oci.open_image(f"oci-archive:{path}")
