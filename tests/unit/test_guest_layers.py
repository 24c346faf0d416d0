"""The guest's layer applier: OCI whiteouts, and no entry ever lands outside the root.

Runs as root on the host, in temporary directories: every escape attempt aims at
a directory the test made next to the root (``outside``), so a failure of the
defence is seen there and touches nothing else.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from agentvm_guest.layers import LayerError, apply_layer

Entry = tuple[str, str, str]  # (name, kind, content / link target)


def layer(*entries: Entry, mode: int = 0o644, uid: int = 0) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, 1_700_000_000
            data = None
            if kind == "file":
                info.size = len(value.encode())
                data = io.BytesIO(value.encode())
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, value
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
            tar.addfile(info, data)
    buf.seek(0)
    return buf


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    return root, outside


def untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755


def test_entries_are_applied_with_owner_mode_and_links(world: tuple[Path, Path]) -> None:
    root, _ = world
    result = apply_layer(
        layer(
            ("bin/busybox", "file", "ELF"),  # its parent comes without an entry
            ("bin/sh", "hardlink", "bin/busybox"),
            ("bin/ls", "symlink", "busybox"),
            ("run/fifo", "fifo", ""),
            ("etc", "dir", ""),
            ("etc/passwd", "file", "root:x:0:0::/root:/bin/sh\n"),
            uid=1000,
            mode=0o751,
        ),
        str(root),
    )
    assert result.entries == 6
    assert (root / "bin" / "busybox").read_text() == "ELF"
    assert (root / "bin" / "sh").stat().st_ino == (root / "bin" / "busybox").stat().st_ino
    assert os.readlink(root / "bin" / "ls") == "busybox"
    assert stat.S_ISFIFO((root / "run" / "fifo").lstat().st_mode)
    st = (root / "etc" / "passwd").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (1000, 0o751, 1_700_000_000)
    assert result.bytes_written == len("ELF") + len("root:x:0:0::/root:/bin/sh\n")


def test_whiteouts_and_opaque_directories_remove_what_lower_layers_put(
    world: tuple[Path, Path],
) -> None:
    root, _ = world
    apply_layer(
        layer(
            ("etc/secret", "file", "lower"),
            ("etc/keep", "file", "lower"),
            ("opt/old/a", "file", "a"),
            ("opt/old/sub/b", "file", "b"),
            ("var/tree/x/y", "file", "y"),
        ),
        str(root),
    )
    result = apply_layer(
        layer(
            ("etc/.wh.secret", "file", ""),
            ("opt/old/new", "file", "this layer"),
            ("opt/old/.wh..wh..opq", "file", ""),
            ("var/.wh.tree", "file", ""),
        ),
        str(root),
    )
    assert result.whiteouts == 3
    assert not (root / "etc" / "secret").exists()
    assert (root / "etc" / "keep").exists()
    assert sorted(p.name for p in (root / "opt" / "old").iterdir()) == ["new"]
    assert not (root / "var" / "tree").exists()


def test_a_planted_symlink_cannot_carry_later_entries_out(world: tuple[Path, Path]) -> None:
    root, outside = world
    inner = str(outside).lstrip("/")  # the same path, inside the image
    apply_layer(
        layer(
            (f"{inner}/", "dir", ""),
            ("outside/", "dir", ""),
            ("abs", "symlink", str(outside)),
            ("rel", "symlink", "../outside"),
            ("deep", "symlink", "../../../../../../../../" + inner),
            ("target", "symlink", str(outside / "secret")),
            ("dirlink", "symlink", str(outside)),
        ),
        str(root),
    )
    apply_layer(
        layer(
            ("abs/planted", "file", "x"),
            ("rel/planted", "file", "x"),
            ("deep/deeper", "file", "x"),
            ("abs/.wh.secret", "file", ""),
            ("rel/.wh..wh..opq", "file", ""),
            ("target", "file", "replaced the link, not the host file"),
            ("dirlink", "dir", ""),
        ),
        str(root),
    )
    untouched(outside)
    # They landed where the image's own "/" puts them.
    assert sorted(p.name for p in (root / inner).iterdir()) == ["deeper", "planted"]
    assert (root / "outside" / "planted").read_text() == "x"
    assert (root / "target").read_text() == "replaced the link, not the host file"
    assert (root / "dirlink").is_dir()
    assert not (root / "dirlink").is_symlink()


def test_a_symlink_that_leads_nowhere_inside_is_an_error(world: tuple[Path, Path]) -> None:
    root, outside = world
    apply_layer(layer(("abs", "symlink", str(outside))), str(root))
    with pytest.raises(LayerError, match="'abs' is a symlink that leads nowhere inside"):
        apply_layer(layer(("abs/planted", "file", "x")), str(root))
    untouched(outside)


def test_a_hard_link_cannot_reach_a_file_outside_through_a_symlink(
    world: tuple[Path, Path],
) -> None:
    root, outside = world
    apply_layer(layer(("lnk", "symlink", str(outside))), str(root))
    with pytest.raises(LayerError, match="which is not in the image"):
        apply_layer(layer(("stolen", "hardlink", "lnk/secret")), str(root))
    assert not (root / "stolen").exists()
    assert (outside / "secret").stat().st_nlink == 1
    untouched(outside)


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ((("../escape", "file", "x"),), "leaves the image's root"),
        ((("/abs", "file", "x"),), "leaves the image's root"),
        ((("dev/mem", "chr", ""),), "is not imported"),
        ((("x", "hardlink", "../outside/secret"),), "leaves the image's root"),
        ((("etc/.wh.", "file", ""),), "a whiteout of nothing"),
        ((("a", "symlink", "b"), ("b", "symlink", "a"), ("a/x", "file", "x")), "symlink"),
    ],
)
def test_what_cannot_be_applied_is_an_error_naming_the_entry(
    world: tuple[Path, Path], entries: tuple[Entry, ...], says: str
) -> None:
    root, outside = world
    with pytest.raises(LayerError, match=says):
        apply_layer(layer(*entries), str(root))
    untouched(outside)


def test_a_truncated_layer_is_an_error(world: tuple[Path, Path]) -> None:
    root, _ = world
    data = layer(("big", "file", "x" * 100_000)).getvalue()
    with pytest.raises(LayerError, match=r"layer ends inside it|not a readable tar stream"):
        apply_layer(io.BytesIO(data[:50_000]), str(root))
