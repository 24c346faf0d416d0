"""OCI images for tests: hand-made ones (each hostile variant differs from a good
archive in exactly one thing) and real ones made with the tools users use (umoci, skopeo).

A busybox root without Python or libc (a static busybox) becomes an OCI
layout with umoci in two layers: the second deletes ``/etc/secret``, which
umoci writes as a whiteout. skopeo then writes the same image as an
oci-archive and a docker-archive. No registry is involved.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentvm.vm_manager import oci

BUSYBOX = Path("/bin/busybox")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def busybox_image(d: Path) -> dict[str, str]:
    """The same image as an OCI layout, an oci-archive and a docker-archive (refs by kind)."""
    layout, bundle = d / "layout", d / "bundle"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:t")
    sh("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (rootfs / "etc" / "secret").write_text("deleted by the upper layer")
    sh("umoci", "repack", "--image", f"{layout}:t", str(bundle))
    # A second layer on top: unpack what is there, change it, repack.
    upper = d / "upper"
    sh("umoci", "unpack", "--image", f"{layout}:t", str(upper))
    (upper / "rootfs" / "etc" / "secret").unlink()
    (upper / "rootfs" / "home" / "app").mkdir(parents=True)
    (upper / "rootfs" / "home" / "app" / "notes").write_text("upper layer\n")
    # The user's home is the user's (clones of a template write there).
    os.chown(upper / "rootfs" / "home" / "app", 1000, 1000)
    sh("umoci", "repack", "--image", f"{layout}:t", str(upper))
    sh(
        "umoci", "config", "--image", f"{layout}:t",
        "--config.env", "GREETING=hello world",
        "--config.workingdir", "/home/app",
        "--config.user", "app",
        "--config.entrypoint", "/bin/sh",
        "--config.cmd", "-c", "--config.cmd", "echo $GREETING",
        "--config.label", "org.example.team=agents",
    )  # fmt: skip
    sh("skopeo", "copy", f"oci:{layout}:t", f"oci-archive:{d}/image.oci.tar")
    sh("skopeo", "copy", f"oci:{layout}:t", f"docker-archive:{d}/image.docker.tar:example:t")
    return {
        "oci": f"oci:{layout}:t",
        "oci-archive": f"oci-archive:{d}/image.oci.tar",
        "docker-archive": f"docker-archive:{d}/image.docker.tar",
    }


Entry = tuple[str, str, bytes | str]  # (name, kind, content or link target)


def make_layer(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = value if isinstance(value, bytes) else value.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(value)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(value)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "blk":
                info.type = tarfile.BLKTYPE
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world"],
    "WorkingDir": "/home/app",
    "User": "app",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hi"],
    "Labels": {"org.example.team": "agents"},
}


def config_doc(layers: list[bytes], **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": CONFIG,
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
    }
    doc.update(over)
    return doc


class Layout:
    """An OCI image layout being written (blobs by digest), then packed or used as a dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes) -> str:
        digest = sha(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    def image(
        self,
        layers: list[bytes],
        *,
        compress: bool = False,
        config: dict[str, Any] | None = None,
        tag: str = "latest",
        mutate: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        cfg = json.dumps(config or config_doc(layers)).encode()
        descs = []
        for layer in layers:
            blob = gzip.compress(layer, mtime=0) if compress else layer
            media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
            descs.append({"mediaType": media, "digest": self.blob(blob), "size": len(blob)})
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": self.blob(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
        if mutate is not None:
            mutate(manifest)
        raw = json.dumps(manifest).encode()
        desc = {
            "mediaType": manifest["mediaType"],
            "digest": self.blob(raw),
            "size": len(raw),
            "annotations": {oci.REF_NAME: tag},
        }
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"manifests": []}
        index["schemaVersion"] = 2
        index["manifests"].append(desc)
        index_path.write_text(json.dumps(index))
        return manifest

    def pack(self, path: Path) -> Path:
        with tarfile.open(path, "w") as tar:
            for f in sorted(self.root.rglob("*")):
                tar.add(f, arcname=f.relative_to(self.root).as_posix(), recursive=False)
        return path


# A small root (not runnable: the busybox is a stand-in) for hand-made images.
BASE_LAYER = make_layer(
    [
        ("bin", "dir", ""),
        ("bin/busybox", "file", b"\x7fELF busybox"),
        ("bin/sh", "hardlink", "bin/busybox"),
        ("bin/ls", "symlink", "busybox"),
        ("etc", "dir", ""),
        ("etc/passwd", "file", "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
        ("etc/secret", "file", "lower"),
        ("opt/old/a", "file", "a"),
        ("run/fifo", "fifo", ""),
    ]
)
