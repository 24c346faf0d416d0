"""The image's root: the second disk a named image brings (docs/IMAGES.md).

A VM of a named image boots agent-vm's own system root; the image's root
file system is an ext4 disk the host attached with a known virtio-blk
serial. :class:`ImageRoot` is the agent's state for it:

- :meth:`ImageRoot.configure` (ConfigureRoot) finds that disk by its serial
  in sysfs (the guest has no udev), mounts it at ``/run/agentvm/root``
  (``nosuid,nodev``) with ``mount(2)`` and keeps the image's config. Once per
  boot; the same call again is a no-op (a clone restored from a memory
  template hears it again);
- :meth:`ImageRoot.plan` (every Execute) turns the image's config and the
  request into the program's environment and a :class:`~.pivot.Pivot`:
  the image's user, resolved against the image's own ``/etc/passwd`` and
  ``/etc/group`` (read inside the root, as hostile input), and the working
  directory, checked inside the root;
- :meth:`ImageRoot.apply_layer` (ApplyLayer, imports) streams one
  uncompressed layer into the root with :func:`.layers.apply_layer`.

Errors are :class:`RootError`, which carries the gRPC status to answer with.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from agentvm.v1 import common_pb2, guest_agent_pb2
from agentvm_guest import libc
from agentvm_guest.layers import LayerError, LayerResult, apply_layer, open_in_root
from agentvm_guest.libc import MS_NODEV, MS_NOSUID
from agentvm_guest.pivot import Pivot

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MOUNT_POINT = "/run/agentvm/root"
SYS_BLOCK = "/sys/block"
DEV_DIR = "/dev"

SERIAL = re.compile(r"[A-Za-z0-9._-]{1,20}")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_DEVICES = 4096
_MAX_SYSFS_READ = 256
# The image's config: every field is capped (it came from an image's JSON).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")
_MAX_ENV = 1024
_MAX_ENV_VALUE = 32 * 1024
_MAX_PATH = 4096
_MAX_ARGS = 1024
_MAX_ARG = 128 * 1024
_MAX_LABELS = 1024
_MAX_LABEL_KEY = 256
_MAX_LABEL_VALUE = 4096
# Users and groups: a name (as in useradd, plus the trailing "$" of machine
# accounts) or a decimal id.
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?"
_USER = re.compile(rf"(?P<user>{_NAME})(?::(?P<group>{_NAME}))?")
_NAME_ONLY = re.compile(_NAME)
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged"
# /etc/passwd and /etc/group of the image are hostile input.
_MAX_DB_BYTES = 4 * 1024 * 1024
_MAX_DB_LINE = 64 * 1024
_MAX_DB_LINES = 200_000
_MAX_GROUPS = 1024

_DIFF_ID = re.compile(r"sha256:([0-9a-f]{64})")


class RootError(Exception):
    """A request about the image's root that fails; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RootError:
    return RootError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _precondition(message: str) -> RootError:
    return RootError(grpc.StatusCode.FAILED_PRECONDITION, message)


# -- ConfigureRoot -------------------------------------------------------------------------
def _check_path(what: str, path: str) -> None:
    if not path.startswith("/") or len(path) > _MAX_PATH or "\0" in path:
        raise _invalid(
            f"{what} {path[:200]!r} must be an absolute path of at most {_MAX_PATH} bytes"
        )


def validate_config(config: common_pb2.ImageConfig) -> None:
    """Refuse a config the agent cannot use; the message names the field."""
    if len(config.env) > _MAX_ENV:
        raise _invalid(f"config.env has {len(config.env)} variables; at most {_MAX_ENV}")
    for name, value in config.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise _invalid(
                f"config.env: {name[:200]!r} is not a variable name "
                "(a letter or _, then letters, digits, _ . -; at most 256)"
            )
        if len(value) > _MAX_ENV_VALUE or "\0" in value:
            raise _invalid(f"config.env[{name!r}] is over {_MAX_ENV_VALUE} bytes or holds NUL")
    if config.workdir:
        _check_path("config.workdir", config.workdir)
    if config.user and not parse_user(config.user):
        raise _invalid(
            f"config.user {config.user[:200]!r} is not a user: give a name, a uid, "
            "uid:gid or name:group"
        )
    for field, args in (("entrypoint", config.entrypoint), ("cmd", config.cmd)):
        if len(args) > _MAX_ARGS or any(len(a) > _MAX_ARG or "\0" in a for a in args):
            raise _invalid(
                f"config.{field}: at most {_MAX_ARGS} arguments of at most {_MAX_ARG} bytes, no NUL"
            )
    if len(config.labels) > _MAX_LABELS or any(
        len(k) > _MAX_LABEL_KEY or len(v) > _MAX_LABEL_VALUE for k, v in config.labels.items()
    ):
        raise _invalid(
            f"config.labels: at most {_MAX_LABELS} labels, keys of at most {_MAX_LABEL_KEY} "
            f"and values of at most {_MAX_LABEL_VALUE} bytes"
        )


def _read_small(path: str) -> str:
    """The first bytes of a sysfs attribute, stripped ("" if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        data = os.read(fd, _MAX_SYSFS_READ)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return data.decode("ascii", "replace").strip()


def find_disk(serial: str, sys_block: str = SYS_BLOCK, dev_dir: str = DEV_DIR) -> str:
    """The device node of the block device whose sysfs serial is ``serial``."""
    try:
        names = sorted(os.listdir(sys_block))[:_MAX_DEVICES]
    except OSError as exc:
        raise _precondition(
            f"cannot list the guest's disks in {sys_block}: {exc.strerror}"
        ) from exc
    found: list[str] = []
    for name in names:
        if not _DEVICE_NAME.fullmatch(name):
            continue
        got = _read_small(os.path.join(sys_block, name, "serial"))
        found.append(f"{name} (serial {got!r})")
        if got != serial:
            continue
        node = os.path.join(dev_dir, name)
        try:
            st = os.stat(node, follow_symlinks=False)
        except OSError as exc:
            raise _precondition(
                f"the disk with serial {serial!r} is {name}, but {node}: {exc.strerror}"
            ) from exc
        if not stat.S_ISBLK(st.st_mode):
            raise _precondition(
                f"the disk with serial {serial!r} is {name}, but {node} is no block device"
            )
        numbers = _read_small(os.path.join(sys_block, name, "dev"))
        if numbers and numbers != f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}":
            raise _precondition(
                f"the disk with serial {serial!r} is {name} ({numbers}), but {node} is "
                f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            )
        return node
    raise _precondition(
        f"no disk with serial {serial!r} in this VM; found: {', '.join(found) or 'no disks'}"
    )


def _prepare_mount_point(path: str) -> None:
    """``path`` is a real directory, root's, mode 0700 (not followed if a symlink)."""
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _precondition(f"the mount point {path} is not a directory")
    os.chown(path, 0, 0, follow_symlinks=False)
    os.chmod(path, 0o700, follow_symlinks=False)


def mount_ext4(device: str, mount_point: str) -> None:
    """Mount ``device`` (ext4) read-write, nosuid, nodev at ``mount_point``.

    Where that device is already mounted there (an agent restarted in the
    same boot), the mount is kept; anything else mounted there is an error.
    """
    if os.path.ismount(mount_point):
        if os.stat(mount_point).st_dev == os.stat(device).st_rdev:
            return
        raise _precondition(f"{mount_point} already holds another file system")
    _prepare_mount_point(mount_point)
    if (
        libc.mount(
            os.fsencode(device), os.fsencode(mount_point), b"ext4", MS_NOSUID | MS_NODEV, None
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise _precondition(
            f"cannot mount {device} (ext4) at {mount_point}: {os.strerror(err)} (errno {err})"
        )


# -- users -------------------------------------------------------------------------------
@dataclass(frozen=True)
class User:
    """Who the program runs as, resolved in the image."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def parse_user(spec: str) -> tuple[str, str] | None:
    """``name|uid[:group|gid]`` split in two ("" for no group); None if malformed."""
    m = _USER.fullmatch(spec)
    if m is None:
        return None
    return m.group("user"), m.group("group") or ""


def _as_id(text: str) -> int | None:
    if text.isdigit() and text.isascii() and len(text) <= 10:
        value = int(text)
        if value <= _MAX_ID:
            return value
    return None


def read_db(root_fd: int, name: str) -> list[list[str]]:
    """The records of the image's ``/etc/<name>`` (passwd, group), fields split on ":".

    Opened inside the image's root (symlinks resolve in it, never out of it),
    only if it is a regular file; at most 4 MiB and 200,000 lines are read;
    over-long, undecodable and empty lines and comments are skipped. A missing
    file has no records.
    """
    try:
        fd = open_in_root(root_fd, f"etc/{name}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        chunks: list[bytes] = []
        size = 0
        while size < _MAX_DB_BYTES:
            chunk = os.read(fd, min(1 << 16, _MAX_DB_BYTES - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    records: list[list[str]] = []
    for i, raw in enumerate(b"".join(chunks).split(b"\n")):
        if i >= _MAX_DB_LINES:
            break
        if len(raw) > _MAX_DB_LINE or not raw.strip() or raw.startswith(b"#"):
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        records.append(line.rstrip("\r").split(":"))
    return records


def resolve_user(root_fd: int, spec: str) -> User:
    """``spec`` (the image's user, "" for root) resolved with the image's own databases.

    The OCI (runc) rules: a name must be in ``/etc/passwd``; a uid need not be
    (then its gid is 0 and its home "/"); a user found there brings its gid,
    home and the supplementary groups ``/etc/group`` lists it in, unless the
    spec names the group, which then must be in ``/etc/group`` unless numeric.
    """
    parsed = parse_user(spec or "0")
    if parsed is None:
        raise _invalid(f"user {spec[:200]!r} is not a name, uid, uid:gid or name:group")
    user_part, group_part = parsed
    uid_arg = _as_id(user_part)
    entry: list[str] | None = None
    for rec in read_db(root_fd, "passwd"):
        if len(rec) != 7 or not _NAME_ONLY.fullmatch(rec[0]):
            continue
        rec_uid, rec_gid = _as_id(rec[2]), _as_id(rec[3])
        if rec_uid is None or rec_gid is None:
            continue
        if (uid_arg is not None and rec_uid == uid_arg) or (
            uid_arg is None and rec[0] == user_part
        ):
            entry = rec
            break
    if entry is None:
        if uid_arg is None:
            raise _precondition(
                f"user {user_part!r} is not in the image's /etc/passwd: give a user the "
                "image has, or a numeric uid"
            )
        uid, gid, home, name = uid_arg, 0, "/", ""
    else:
        uid, gid, name = int(entry[2]), int(entry[3]), entry[0]
        home = entry[5] if entry[5].startswith("/") and len(entry[5]) <= _MAX_PATH else "/"
    groups: list[int] = []
    if group_part:
        gid_arg = _as_id(group_part)
        found = None
        for rec in read_db(root_fd, "group"):
            if len(rec) != 4 or _as_id(rec[2]) is None:
                continue
            if (gid_arg is not None and _as_id(rec[2]) == gid_arg) or rec[0] == group_part:
                found = _as_id(rec[2])
                break
        if found is None:
            if gid_arg is None:
                raise _precondition(
                    f"group {group_part!r} (of user {spec!r}) is not in the image's /etc/group"
                )
            found = gid_arg
        gid = found
    elif name:
        for rec in read_db(root_fd, "group"):
            rec_gid = _as_id(rec[2]) if len(rec) == 4 else None
            if rec_gid is None or name not in rec[3].split(","):
                continue
            if rec_gid not in groups:
                groups.append(rec_gid)
            if len(groups) >= _MAX_GROUPS:
                break
    return User(uid=uid, gid=gid, groups=tuple(groups), home=home)


# -- ApplyLayer --------------------------------------------------------------------------
class _LayerStream(io.RawIOBase):
    """The chunks of an ApplyLayer stream as a file; hashes and counts them as they come."""

    def __init__(self, messages: Iterator[guest_agent_pb2.ApplyLayerRequest], size: int) -> None:
        self._messages = messages
        self.size = size
        self.received = 0
        self.ended = False
        self.sha256 = hashlib.sha256()
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        """The next non-empty chunk into the buffer; False at the end of the stream."""
        while not self.ended:
            msg = next(self._messages, None)
            if msg is None:
                self.ended = True
                break
            if msg.WhichOneof("part") != "chunk":
                raise _invalid("ApplyLayer: only the first message may be (and is) the header")
            if self.received + len(msg.chunk) > self.size:
                raise _invalid(
                    f"ApplyLayer: the stream is longer than the header's size ({self.size} bytes)"
                )
            self.received += len(msg.chunk)
            self.sha256.update(msg.chunk)
            if msg.chunk:
                self._chunk = memoryview(msg.chunk)
                return True
        return False

    def readinto(self, buffer: WriteableBuffer) -> int:
        if not self._chunk and not self._next():
            return 0
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._chunk))
        out[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def drain(self) -> None:
        """Read (and hash) what is left of the stream."""
        self._chunk = memoryview(b"")
        while self._next():
            self._chunk = memoryview(b"")


# -- the state -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Configured:
    serial: str
    config: common_pb2.ImageConfig


class ImageRoot:
    """The agent's image root: none until :meth:`configure` succeeds, then fixed."""

    def __init__(
        self,
        mount_point: str = MOUNT_POINT,
        *,
        sys_block: str = SYS_BLOCK,
        dev_dir: str = DEV_DIR,
    ) -> None:
        self.mount_point = mount_point
        self._sys_block = sys_block
        self._dev_dir = dev_dir
        self._lock = threading.Lock()
        self._applying = threading.Lock()
        self._state: _Configured | None = None

    @property
    def configured(self) -> bool:
        return self._state is not None

    def configure(self, request: guest_agent_pb2.ConfigureRootRequest) -> str:
        """ConfigureRoot: find and mount the disk, keep the config; the mount point."""
        if not SERIAL.fullmatch(request.serial):
            raise _invalid(f"serial {request.serial[:200]!r} must be 1 to 20 of A-Z a-z 0-9 . _ -")
        validate_config(request.config)
        config = common_pb2.ImageConfig()
        config.CopyFrom(request.config)
        with self._lock:
            if self._state is not None:
                if self._state.serial == request.serial and self._state.config == config:
                    return self.mount_point
                if self._state.serial != request.serial:
                    raise _precondition(
                        f"the image's root is already the disk with serial "
                        f"{self._state.serial!r}; it cannot change to {request.serial!r} "
                        "in this boot"
                    )
                raise _precondition(
                    f"the image's root (serial {request.serial!r}) is already configured "
                    "with another config; it cannot change in this boot"
                )
            device = find_disk(request.serial, self._sys_block, self._dev_dir)
            try:
                mount_ext4(device, self.mount_point)
            except OSError as exc:
                raise _precondition(
                    f"cannot prepare {self.mount_point} for the image's root: {exc}"
                ) from exc
            self._state = _Configured(request.serial, config)
        return self.mount_point

    def plan(self, cwd: str, env: dict[str, str], workspace: str) -> Pivot | None:
        """How an Execute runs in the image (None: no image, the agent's root as always).

        ``env`` (the agent's defaults) gets the user's HOME, then the image's
        env, in place; the request's env goes over it after. ``cwd`` is the
        request's (default: the image's workdir, else "/"), a path in the
        image's root, where ``/workspace`` is the VM's workspace.
        """
        state = self._state
        if state is None:
            return None
        cwd = cwd or state.config.workdir or "/"
        _check_cwd(cwd)
        try:
            root_fd = os.open(self.mount_point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _precondition(f"the image's root {self.mount_point}: {exc.strerror}") from exc
        try:
            user = resolve_user(root_fd, state.config.user)
            _check_dir(root_fd, cwd, workspace)
        finally:
            os.close(root_fd)
        env["HOME"] = user.home
        env.update(state.config.env)
        try:
            return Pivot.prepare(
                self.mount_point,
                workspace=workspace,
                cwd=cwd,
                uid=user.uid,
                gid=user.gid,
                groups=user.groups,
            )
        except OSError as exc:
            raise _precondition(f"cannot prepare the image's root: {exc}") from exc

    def apply_layer(self, messages: Iterator[guest_agent_pb2.ApplyLayerRequest]) -> LayerResult:
        """ApplyLayer: stream one uncompressed layer into the root.

        The first message is the header; the chunks follow, at most
        ``header.size`` bytes in all (more: INVALID_ARGUMENT). A stream
        shorter than that or whose SHA-256 is not the diff_id is DATA_LOSS; a
        layer the applier refuses is INVALID_ARGUMENT naming the entry. On
        either error the layer may be partly applied: it is not rolled back,
        the host discards the whole image being imported. One layer at a
        time (ABORTED while another is applied).
        """
        if self._state is None:
            raise _precondition("ApplyLayer: no image root; call ConfigureRoot first")
        first = next(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise _invalid("ApplyLayer: the first message must be the header")
        header = first.header
        m = _DIFF_ID.fullmatch(header.diff_id)
        if m is None:
            raise _invalid(
                f"ApplyLayer: diff_id {header.diff_id[:200]!r} is not sha256:<64 lowercase hex>"
            )
        if not self._applying.acquire(blocking=False):
            raise RootError(grpc.StatusCode.ABORTED, "ApplyLayer: another layer is being applied")
        try:
            stream = _LayerStream(messages, header.size)
            failure: LayerError | None = None
            result = LayerResult()
            try:
                result = apply_layer(io.BufferedReader(stream, 1 << 20), self.mount_point)
            except LayerError as exc:
                failure = exc
            stream.drain()
            if stream.received != header.size:
                raise RootError(
                    grpc.StatusCode.DATA_LOSS,
                    f"ApplyLayer {header.diff_id}: the stream ended after {stream.received} "
                    f"of {header.size} bytes",
                )
            if stream.sha256.hexdigest() != m.group(1):
                raise RootError(
                    grpc.StatusCode.DATA_LOSS,
                    f"ApplyLayer: the layer's bytes have sha256:{stream.sha256.hexdigest()}, "
                    f"not its diff_id {header.diff_id}",
                )
            if failure is not None:
                raise _invalid(f"ApplyLayer {header.diff_id}: {failure}")
            return result
        finally:
            self._applying.release()


def _check_cwd(cwd: str) -> None:
    if not cwd.startswith("/") or len(cwd) > _MAX_PATH or "\0" in cwd:
        raise _invalid(f"cwd {cwd[:200]!r} must be an absolute path in the image")


def _check_dir(root_fd: int, cwd: str, workspace: str) -> None:
    """``cwd`` is a directory in the image's root (under /workspace: in the workspace)."""
    rel = cwd.strip("/")
    base_fd = root_fd
    opened = -1
    if rel == "workspace" or rel.startswith("workspace/"):
        try:
            opened = base_fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise _invalid(f"cwd {cwd!r}: the VM has no workspace") from None
        rel = rel[len("workspace") :].lstrip("/")
    try:
        os.close(open_in_root(base_fd, rel, os.O_PATH | os.O_DIRECTORY))
    except OSError:
        raise _invalid(f"cwd {cwd[:200]!r} is not a directory in the image") from None
    finally:
        if opened >= 0:
            os.close(opened)
