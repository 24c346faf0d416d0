"""Guest image: Debian bookworm root file system, kernel and a minimal initrd.

Layout of the cache directory (``AGENTVM_CACHE_DIR``, default
``/var/cache/agent-vm``)::

    base/rootfs-<basekey>.tar    mmdebstrap output, reused while the package
                                 list is unchanged
    images/<id>/rootfs.qcow2     read-only base disk of every VM
    images/<id>/vmlinuz          kernel for direct kernel boot
    images/<id>/initrd.img       busybox + virtio modules, mounts /dev/vda
    images/<id>/manifest.json    kernel, packages, versions, hashes
    images/current -> <id>

``<id>`` is a hash of every build input (packages, wheel pins, guest agent
code, boot scripts, builder version): a change to any of them makes the image
stale and ``agent-vm image build`` makes a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from agentvm.common.errors import FailedPrecondition

BUILDER_VERSION = "3"
SUITE = "bookworm"
GUEST_PACKAGES = ("python3", "linux-image-cloud-amd64", "busybox", "ca-certificates")
WHEELS = ("grpcio", "protobuf", "typing_extensions")
INITRD_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "virtio_balloon",  # free page reporting (domain_xml.MemBalloon)
)
# The image's root file system; each VM's guest grows it to the VM's disk at
# its first boot (guest/agentvm_guest/sysinit.py), which reads the size it spans
# from /etc/agentvm/root-sectors.
ROOTFS_MIB = 2048
# How every Debian root is made: documentation, manuals and translations are left out.
MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
REPO_ROOT = Path(__file__).resolve().parents[3]
GUEST_DIR = REPO_ROOT / "guest"
PROTO_OUT = REPO_ROOT / "services" / "agentvm" / "v1"
GUEST_PROTOS = ("common_pb2.py", "guest_agent_pb2.py", "guest_agent_pb2_grpc.py")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Manifest:
    """What an image contains; written as manifest.json next to it."""

    id: str
    distribution: str
    kernel_release: str
    built_at: float
    packages: list[str]
    wheels: list[str]
    agent_version: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Hash over the hashes of the image files."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}={self.files[name]}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class ImagePaths:
    """Files of one built image."""

    root: Path

    @property
    def disk(self) -> Path:
        return self.root / "rootfs.qcow2"

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def load_manifest(self) -> Manifest:
        return Manifest(**json.loads(self.manifest.read_text()))


def wheel_pins() -> list[str]:
    """grpcio/protobuf pins for the guest: the versions installed on the host."""
    return [f"{name}=={metadata.version(name)}" for name in WHEELS]


def _guest_files() -> list[tuple[Path, str]]:
    """(source, destination under /opt/agentvm/site) of the guest agent's code."""
    files = [
        (p, f"agentvm_guest/{p.name}") for p in sorted((GUEST_DIR / "agentvm_guest").glob("*.py"))
    ]
    files.append((REPO_ROOT / "services" / "agentvm" / "__init__.py", "agentvm/__init__.py"))
    files.append((PROTO_OUT / "__init__.py", "agentvm/v1/__init__.py"))
    files += [(PROTO_OUT / name, f"agentvm/v1/{name}") for name in GUEST_PROTOS]
    return files


def _boot_files() -> list[Path]:
    return sorted((GUEST_DIR / "image").iterdir())


def base_key() -> str:
    h = hashlib.sha256(f"{BUILDER_VERSION}|{SUITE}|{','.join(GUEST_PACKAGES)}".encode())
    return h.hexdigest()[:16]


def inputs_id() -> str:
    """Id of the image this version of agent-vm builds."""
    h = hashlib.sha256()
    h.update(f"{base_key()}|{BUILDER_VERSION}|{','.join(wheel_pins())}|{INITRD_MODULES}".encode())
    for src, dest in _guest_files():
        if not src.exists():
            raise FailedPrecondition(
                f"generated code {src} is missing: run scripts/gen_protos.sh (setup.sh does)"
            )
        h.update(dest.encode() + b"\0" + src.read_bytes())
    for path in _boot_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def mmdebstrap_command(include: Iterable[str], out: Path, fmt: str) -> list[str]:
    """The mmdebstrap call of every Debian root agent-vm makes (built-in and spec images).

    One variant, suite and set of excludes, and the host's apt sources (no
    mirror argument: mmdebstrap uses the host's for a matching suite).
    """
    return [
        "mmdebstrap",
        *MMDEBSTRAP_OPTIONS,
        "--include=" + ",".join(include),
        f"--format={fmt}",
        SUITE,
        str(out),
    ]


def installed_packages(root: Path) -> list[str]:
    """``name=version`` of every package dpkg installed in the root file system ``root``."""
    proc = subprocess.run(
        [
            "dpkg-query",
            "--admindir",
            str(root / "var/lib/dpkg"),
            "-W",
            "-f",
            "${Package}=${Version}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line for line in proc.stdout.splitlines() if line)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], log: Log, **kwargs: object) -> None:
    log("$ " + " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise FailedPrecondition(
            f"image build step failed ({cmd[0]} exit {proc.returncode}): " + " | ".join(tail)
        )


def resolve_modules(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise FailedPrecondition(f"kernel module {name} not found in {modules_dir}")
        visit(by_name[key])
    return order


def _is_static(path: Path) -> bool:
    head = path.read_bytes()[:8192]
    return head[:4] == b"\x7fELF" and b"ld-linux" not in head


def write_cpio_newc(root: Path, out: Path) -> None:
    """A gzip'ed cpio (newc) archive of ``root``, the format the kernel unpacks."""

    def header(name: str, mode: int, size: int, ino: int) -> bytes:
        fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
        hdr = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        data = hdr + name.encode() + b"\0"
        return data + b"\0" * (-len(data) % 4)

    with gzip.open(out, "wb", compresslevel=6) as fh:
        ino = 1
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                target = os.readlink(path).encode()
                fh.write(header(rel, st.st_mode, len(target), ino) + target)
                fh.write(b"\0" * (-len(target) % 4))
            elif path.is_dir():
                fh.write(header(rel, st.st_mode, 0, ino))
            else:
                data = path.read_bytes()
                fh.write(header(rel, st.st_mode, len(data), ino) + data + b"\0" * (-len(data) % 4))
            ino += 1
        fh.write(header("TRAILER!!!", 0, 0, 0))


class ImageStore:
    """Builds guest images and finds the current one."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.images_dir = cache_dir / "images"

    def paths(self, image_id: str) -> ImagePaths:
        return ImagePaths(self.images_dir / image_id)

    def expected(self) -> ImagePaths:
        """Where the image for this version's inputs is (or will be)."""
        return self.paths(inputs_id())

    def current(self) -> ImagePaths | None:
        """The built image for this version's inputs, or None."""
        paths = self.expected()
        return paths if paths.manifest.exists() else None

    def any_built(self) -> ImagePaths | None:
        """The newest built image, even if built from other inputs."""
        link = self.images_dir / "current"
        if link.is_symlink() and (link.resolve() / "manifest.json").exists():
            return ImagePaths(link.resolve())
        return None

    def require_current(self) -> ImagePaths:
        paths = self.current()
        if paths is None:
            raise FailedPrecondition(
                "no guest image is built for this version of agent-vm: run "
                "`agent-vm image build` (about a minute)"
            )
        return paths

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / ".build.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def build(self, *, force: bool = False, log: Log = lambda _m: None) -> Manifest:
        """Build the image for this version's inputs (no-op when present unless ``force``)."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.cache_dir, 0o755)
        except OSError as exc:
            # The service's setting, not the request: FAILED_PRECONDITION.
            raise FailedPrecondition(
                f"cache directory {self.cache_dir} is not usable ({exc}): set AGENTVM_CACHE_DIR "
                "to a writable directory outside /root"
            ) from exc
        with self._lock():
            image_id = inputs_id()
            paths = self.paths(image_id)
            if paths.manifest.exists() and not force:
                log(f"image {image_id} is up to date")
                return paths.load_manifest()
            return self._build(image_id, log)

    def _base_tar(self, log: Log) -> Path:
        base_dir = self.cache_dir / "base"
        base_dir.mkdir(exist_ok=True)
        tar = base_dir / f"rootfs-{base_key()}.tar"
        if tar.exists():
            log(f"reusing base root file system {tar.name}")
            return tar
        if shutil.which("mmdebstrap") is None:
            raise FailedPrecondition("mmdebstrap is not installed: apt-get install mmdebstrap")
        log(f"building the base root file system with mmdebstrap ({SUITE}, about a minute)")
        tmp = tar.with_suffix(".tmp")
        _run(mmdebstrap_command(GUEST_PACKAGES, tmp, "tar"), log)
        tmp.rename(tar)
        return tar

    def _build(self, image_id: str, log: Log) -> Manifest:
        start = time.monotonic()
        tar = self._base_tar(log)
        self.images_dir.mkdir(exist_ok=True)
        os.chmod(self.images_dir, 0o755)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix=".build-") as tmpdir:
            work = Path(tmpdir)
            root = work / "root"
            root.mkdir()
            log("unpacking the base root file system")
            _run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(root)], log)
            out = work / "out"
            out.mkdir()
            kernel_release = self._install_kernel(root, out, log)
            self._install_agent(root, log)
            packages = installed_packages(root)
            self._make_initrd(root, out, kernel_release, work, log)
            self._make_disk(root, out, work, log)
            files = {p.name: _sha256(p) for p in sorted(out.iterdir())}
            from agentvm_guest import __version__ as agent_version

            manifest = Manifest(
                id=image_id,
                distribution=f"debian-{SUITE}",
                kernel_release=kernel_release,
                built_at=time.time(),
                packages=packages,
                wheels=wheel_pins(),
                agent_version=agent_version,
                files=files,
            )
            (out / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2) + "\n")
            for p in out.iterdir():
                os.chmod(p, 0o644)
            os.chmod(out, 0o755)
            final = self.paths(image_id).root
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
        link = self.images_dir / "current"
        tmp_link = self.images_dir / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(image_id)
        tmp_link.replace(link)
        self._prune(keep={image_id})
        log(f"image {image_id} built in {time.monotonic() - start:.0f} s")
        return manifest

    def _install_kernel(self, root: Path, out: Path, log: Log) -> str:
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise FailedPrecondition("the base root file system has no kernel in /boot")
        kernel = kernels[-1]
        release = kernel.name.removeprefix("vmlinuz-")
        shutil.copyfile(kernel, out / "vmlinuz")
        for p in (root / "boot").iterdir():
            if p.is_file():
                p.unlink()
        log(f"kernel {release}")
        return release

    def _install_agent(self, root: Path, log: Log) -> None:
        site = root / "opt" / "agentvm" / "site"
        site.mkdir(parents=True)
        log("installing grpcio/protobuf wheels for the guest: " + " ".join(wheel_pins()))
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--target",
                str(site),
                *wheel_pins(),
            ],
            log,
        )
        for src, dest in _guest_files():
            target = site / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        _run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], log)
        image_dir = GUEST_DIR / "image"
        sbin = root / "usr" / "local" / "sbin"
        sbin.mkdir(parents=True, exist_ok=True)
        for name in ("agentvm-agent", "agentvm-dhcp"):
            shutil.copyfile(image_dir / name, sbin / name)
            os.chmod(sbin / name, 0o755)
        shutil.copyfile(image_dir / "inittab", root / "etc" / "inittab")
        init = root / "sbin" / "init"
        with contextlib.suppress(FileNotFoundError):
            init.unlink()
        init.symlink_to("/bin/busybox")
        (root / "etc" / "hostname").write_text("agent-vm\n")
        (root / "etc" / "agentvm").mkdir(exist_ok=True)
        (root / "etc" / "agentvm" / "root-sectors").write_text(f"{ROOTFS_MIB * 2048}\n")
        (root / "etc" / "fstab").write_text("# root is mounted by the initrd\n")
        with contextlib.suppress(FileNotFoundError):
            (root / "etc" / "machine-id").unlink()
        (root / "etc" / "machine-id").write_text("")
        shutil.rmtree(root / "var" / "lib" / "apt" / "lists", ignore_errors=True)
        shutil.rmtree(root / "var" / "cache" / "apt", ignore_errors=True)

    def _make_initrd(self, root: Path, out: Path, release: str, work: Path, log: Log) -> None:
        busybox = Path("/bin/busybox")
        if not busybox.exists() or not _is_static(busybox):
            raise FailedPrecondition(
                "a static busybox is needed for the initrd: apt-get install busybox-static"
            )
        log("making the initrd (busybox + virtio modules)")
        modules_dir = root / "lib" / "modules" / release
        order = resolve_modules(modules_dir, INITRD_MODULES)
        initrd = work / "initrd"
        for d in ("bin", "dev", "proc", "modules", "newroot"):
            (initrd / d).mkdir(parents=True)
        shutil.copyfile(busybox, initrd / "bin" / "busybox")
        os.chmod(initrd / "bin" / "busybox", 0o755)
        (initrd / "bin" / "sh").symlink_to("busybox")
        shutil.copyfile(GUEST_DIR / "image" / "initrd-init", initrd / "init")
        os.chmod(initrd / "init", 0o755)
        names = []
        for rel in order:
            name = Path(rel).name
            shutil.copyfile(modules_dir / rel, initrd / "modules" / name)
            names.append(name)
        (initrd / "modules.order").write_text("\n".join(names) + "\n")
        write_cpio_newc(initrd, out / "initrd.img")

    def _make_disk(self, root: Path, out: Path, work: Path, log: Log) -> None:
        log("making the root disk (ext4 -> qcow2)")
        raw = work / "rootfs.raw"
        _run(
            [
                "mke2fs",
                "-q",
                "-t",
                "ext4",
                "-L",
                "agentvm-root",
                "-d",
                str(root),
                "-E",
                "root_owner=0:0",
                "-F",
                str(raw),
                f"{ROOTFS_MIB}M",
            ],
            log,
        )
        _run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(out / "rootfs.qcow2"),
            ],
            log,
        )
        raw.unlink()

    def _prune(self, keep: set[str]) -> None:
        """Remove older images, keeping the newest few (running VMs may use them)."""
        images = sorted(
            (p for p in self.images_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for p in images[:-3]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
