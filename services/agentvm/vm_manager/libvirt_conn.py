"""The libvirt connection, and the one place libvirt errors become agent-vm errors."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from agentvm.common.errors import (
    AgentVMError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("agentvm.vm_manager.libvirt")
T = TypeVar("T")

# libvirt domain states (virDomainState).
DOMAIN_NOSTATE = 0
DOMAIN_RUNNING = 1
DOMAIN_BLOCKED = 2
DOMAIN_PAUSED = 3
DOMAIN_SHUTDOWN = 4
DOMAIN_SHUTOFF = 5
DOMAIN_CRASHED = 6
DOMAIN_PMSUSPENDED = 7

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
}
# Connection-level failures only: VIR_ERR_SYSTEM_ERROR also covers e.g. a file
# QEMU cannot open, where "is libvirtd running?" would mislead.
_UNAVAILABLE = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}
_INVALID = {libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_INVALID_ARG}


def translate(exc: libvirt.libvirtError, what: str) -> AgentVMError:
    """Map a libvirt error to the agent-vm error tree by its error code."""
    code = exc.get_error_code()
    msg = f"{what}: {exc.get_error_message()}"
    if code in _NOT_FOUND:
        return NotFound(msg)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return FailedPrecondition(msg)
    if code in (libvirt.VIR_ERR_DOM_EXIST,):
        return AlreadyExists(msg)
    if code in _INVALID:
        return InvalidArgument(msg)
    if code in _UNAVAILABLE:
        return Unavailable(msg + " (is libvirtd running? `agent-vm doctor` checks)")
    if _broken(exc):
        # The connection died under the call (libvirtd restarting: "End of file
        # while reading data"): nothing is known to be wrong with the request.
        # Found by the soak, which got INTERNAL for a metadata write.
        return Unavailable(
            msg + " (the connection to libvirtd was lost during the call, e.g. a libvirtd "
            "restart: try again)"
        )
    return AgentVMError(msg)


# A start that failed with EAGAIN started nothing, and the same call a moment
# later succeeds. Seen (CI, 2026-12) as "failed to load cgroup BPF prog:
# Resource temporarily unavailable": libvirt's cgroup v2 device filter, which
# the kernel's verifier refuses with EAGAIN while a signal is pending.
_TRANSIENT = "Resource temporarily unavailable"


def launch(dom: libvirt.virDomain, flags: int = 0, attempts: int = 3, pause: float = 0.2) -> None:
    """Start a defined domain (``createWithFlags``), retrying a transient EAGAIN.

    Blocking: call it in a thread. Any other error is raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            dom.createWithFlags(flags)
            return
        except libvirt.libvirtError as exc:
            if attempt == attempts or _TRANSIENT not in (exc.get_error_message() or ""):
                raise
            log.warning(
                "starting %s: %s; trying again (%d/%d)",
                dom.name(),
                exc.get_error_message(),
                attempt,
                attempts,
            )
            time.sleep(pause * attempt)


@contextlib.contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    """Translate libvirt errors raised in the block (``raise ... from``)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from exc


def _broken(exc: libvirt.libvirtError) -> bool:
    """The connection itself failed (libvirtd restarted or died), not the request.

    VIR_ERR_INVALID_CONN ("invalid connection pointer"): another thread found the
    shared connection broken and closed it while this call held it (CI's short
    soak, a libvirtd restart).
    """
    return exc.get_error_domain() == libvirt.VIR_FROM_RPC or exc.get_error_code() in (
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_INVALID_CONN,
    )


def connection_lost(exc: Exception) -> AgentVMError | None:
    """A raw libvirt error of a lost connection that escaped a handler, as the
    UNAVAILABLE "try again" it is (grpc_util.translate_unexpected); None for any
    other error, which stays INTERNAL. Two such reads were found by the soak."""
    if isinstance(exc, libvirt.libvirtError) and _broken(exc):
        return translate(exc, "vm-manager's call to libvirt")
    return None


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_silence, None)


# Once a connection it had is lost (libvirtd restarting: an upgrade, an OOM
# kill), opening a new one is tried again for this long before callers get
# UNAVAILABLE: a restart costs them a few seconds, not an error. A libvirtd
# never reached, or gone for longer, fails at once.
RECONNECT_GRACE_S = 20.0
RECONNECT_PAUSE_S = 0.25


class LibvirtConnection:
    """A lazily (re)opened connection to one libvirt URI. Thread-safe."""

    def __init__(self, uri: str, reconnect_grace: float = RECONNECT_GRACE_S) -> None:
        self.uri = uri
        self.reconnect_grace = reconnect_grace
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        # When the last connection was found lost (None: none was, or reopened since).
        self._lost_at: float | None = None
        # Told how long libvirt was away when a lost connection is open again (called
        # from the thread that reopened it).
        self.on_reconnect: Callable[[float], None] | None = None

    def get(self) -> libvirt.virConnect:
        """The open connection; opens (or reopens a dead one) on demand."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
                self._lost_at = time.monotonic()
            return self._open()

    def _open(self) -> libvirt.virConnect:
        """Open (the lock held), trying again within the grace after a lost connection."""
        until = self._lost_at + self.reconnect_grace if self._lost_at is not None else 0.0
        while True:
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                if time.monotonic() < until:
                    time.sleep(RECONNECT_PAUSE_S)
                    continue
                raise Unavailable(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}. "
                    "Start libvirtd (and virtlogd), or set AGENTVM_LIBVIRT_URI; "
                    "`agent-vm doctor` shows what is missing"
                ) from exc
            if self._lost_at is not None:
                away = time.monotonic() - self._lost_at
                log.info("libvirt reconnected %.1f s after the connection was lost", away)
                self._lost_at = None
                if self.on_reconnect is not None:
                    self.on_reconnect(away)
            return self._conn

    def call(self, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """``fn(connection)``, once more on a fresh connection if the old one broke.

        After libvirtd restarts, the old connection still says it is alive;
        its first use fails ("Cannot write data: Broken pipe"). That call is
        repeated on a new connection instead of failing the caller's request.
        """
        conn = self.get()
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if not _broken(exc):
                raise translate(exc, what) from exc
            log.warning("libvirt connection lost (%s); reconnecting", exc.get_error_message())
            self._drop(conn)
        with libvirt_errors(what):
            return fn(self.get())

    def checked(self) -> libvirt.virConnect:
        """A connection that has just answered (reopened if libvirtd restarted)."""

        def probe(c: libvirt.virConnect) -> libvirt.virConnect:
            c.getLibVersion()
            return c

        return self.call("connecting to libvirt", probe)

    def _drop(self, conn: libvirt.virConnect) -> None:
        with self._lock:
            old = self._conn
            if old is None or old is not conn:
                return  # another caller reconnected already
            self._conn = None
            self._lost_at = time.monotonic()
        with contextlib.suppress(libvirt.libvirtError):
            old.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def lookup(self, name: str) -> libvirt.virDomain:
        return self.call(f"VM {name}", lambda c: c.lookupByName(name))

    def find(self, name: str) -> libvirt.virDomain | None:
        """The domain called ``name``, or None."""
        try:
            return self.lookup(name)
        except NotFound:
            return None

    def define(self, xml: str) -> libvirt.virDomain:
        return self.call("defining the domain", lambda c: c.defineXML(xml))

    def list_domains(self, prefix: str) -> list[libvirt.virDomain]:
        return self.call(
            "listing domains",
            lambda c: [d for d in c.listAllDomains(0) if d.name().startswith(prefix)],
        )

    def versions(self) -> tuple[str, str]:
        """(libvirt version, hypervisor version) as dotted strings."""

        def dotted(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        return self.call(
            "reading versions", lambda c: (dotted(c.getLibVersion()), dotted(c.getVersion()))
        )

    @staticmethod
    def state(dom: Any) -> int:
        """The domain's libvirt state (virDomainState)."""
        with libvirt_errors(f"state of {dom.name()}"):
            return int(dom.state()[0])
