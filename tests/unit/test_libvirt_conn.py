"""libvirt error translation and LibvirtConnection, on libvirt's in-process test driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import libvirt
import pytest

from agentvm.common.errors import (
    AgentVMError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from agentvm.vm_manager import libvirt_conn
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, libvirt_errors, translate

TEST_URI = "test:///default"


def libvirt_error(code: int, message: str = "boom") -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (
        code,
        libvirt.VIR_FROM_DOMAIN,
        message,
        libvirt.VIR_ERR_ERROR,
        None,
        None,
        None,
        -1,
        -1,
    )
    return exc


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, NotFound),
        (libvirt.VIR_ERR_NO_NETWORK, NotFound),
        (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, NotFound),
        (libvirt.VIR_ERR_OPERATION_INVALID, FailedPrecondition),
        (libvirt.VIR_ERR_DOM_EXIST, AlreadyExists),
        (libvirt.VIR_ERR_XML_ERROR, InvalidArgument),
        (libvirt.VIR_ERR_XML_DETAIL, InvalidArgument),
        (libvirt.VIR_ERR_INVALID_ARG, InvalidArgument),
        (libvirt.VIR_ERR_NO_CONNECT, Unavailable),
        (libvirt.VIR_ERR_INVALID_CONN, Unavailable),
        (libvirt.VIR_ERR_SYSTEM_ERROR, AgentVMError),
        (libvirt.VIR_ERR_RPC, Unavailable),
        (libvirt.VIR_ERR_AUTH_FAILED, Unavailable),
        (libvirt.VIR_ERR_INTERNAL_ERROR, AgentVMError),
        (libvirt.VIR_ERR_OPERATION_FAILED, AgentVMError),
    ],
)
def test_translate_by_code(code: int, expected: type[AgentVMError]) -> None:
    err = translate(libvirt_error(code, "it broke"), "VM x")
    assert type(err) is expected
    assert err.message.startswith("VM x: it broke")
    if expected is Unavailable:
        assert "libvirtd" in err.message


def test_a_connection_lost_under_a_call_is_unavailable_not_internal() -> None:
    """libvirtd restarting while a call waits for its answer (seen by the soak)."""
    exc = libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "End of file while reading data")
    exc.err = (exc.err[0], libvirt.VIR_FROM_RPC, *exc.err[2:])
    err = translate(exc, "recording the record of agent-vm-x")
    assert type(err) is Unavailable
    assert "lost during the call" in err.message
    assert err.message.startswith("recording the record of agent-vm-x: End of file")


def test_libvirt_errors_context_manager_chains() -> None:
    original = libvirt_error(libvirt.VIR_ERR_NO_DOMAIN)
    with pytest.raises(NotFound) as info, libvirt_errors("looking"):
        raise original
    assert info.value.__cause__ is original
    with libvirt_errors("nothing"):
        pass  # no error, nothing raised


@pytest.fixture
def conn() -> Iterator[LibvirtConnection]:
    c = LibvirtConnection(TEST_URI)
    try:
        yield c
    finally:
        c.close()


def domain_xml(name: str, uid: str | None = None) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uid or uuid.uuid4()}</uuid>"
        "<memory unit='MiB'>128</memory><os><type>hvm</type></os></domain>"
    )


@pytest.fixture
def defined(conn: LibvirtConnection) -> Iterator[libvirt.virDomain]:
    dom = conn.define(domain_xml(f"agent-vm-unit-{uuid.uuid4().hex[:8]}"))
    try:
        yield dom
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_real_not_found_error(conn: LibvirtConnection) -> None:
    with pytest.raises(NotFound, match="VM agent-vm-missing"):
        conn.lookup("agent-vm-missing")
    assert conn.find("agent-vm-missing") is None


def test_lookup_find_define(conn: LibvirtConnection, defined: libvirt.virDomain) -> None:
    name = defined.name()
    assert conn.lookup(name).UUIDString() == defined.UUIDString()
    found = conn.find(name)
    assert found is not None
    assert found.name() == name
    assert LibvirtConnection.state(found) == libvirt_conn.DOMAIN_SHUTOFF
    found.create()
    assert LibvirtConnection.state(found) == libvirt_conn.DOMAIN_RUNNING


def test_define_errors(conn: LibvirtConnection, defined: libvirt.virDomain) -> None:
    with pytest.raises(InvalidArgument, match="defining the domain"):
        conn.define("<domain type='test'><name>x</name>")  # not even XML
    # Same name, other UUID: libvirt refuses; whatever its code, it is an AgentVMError.
    with pytest.raises(AgentVMError, match="defining the domain"):
        conn.define(domain_xml(defined.name()))


def test_operation_invalid_is_failed_precondition(defined: libvirt.virDomain) -> None:
    with pytest.raises(FailedPrecondition), libvirt_errors("stopping"):
        defined.destroy()  # not running


def test_list_domains_by_prefix(conn: LibvirtConnection, defined: libvirt.virDomain) -> None:
    names = [d.name() for d in conn.list_domains("agent-vm-unit-")]
    assert defined.name() in names
    assert all(n.startswith("agent-vm-unit-") for n in names)
    assert "test" in [d.name() for d in conn.list_domains("")]  # the driver's own domain
    assert conn.list_domains("agent-vm-nothing-") == []


def test_versions(conn: LibvirtConnection) -> None:
    lib, hv = conn.versions()
    major, minor, micro = (int(p) for p in lib.split("."))
    assert (major, minor, micro) == libvirt_version_tuple(conn.get().getLibVersion())
    assert hv.count(".") == 2


def libvirt_version_tuple(v: int) -> tuple[int, int, int]:
    return v // 1_000_000, v // 1000 % 1000, v % 1000


def test_get_reuses_and_reopens(conn: LibvirtConnection) -> None:
    first = conn.get()
    assert conn.get() is first
    conn.close()
    second = conn.get()
    assert second is not first
    assert second.isAlive()


def test_a_connection_closed_under_a_call_by_another_thread_is_reopened() -> None:
    """A libvirtd restart: one thread drops (closes) the shared connection while
    another still holds it; the holder's call is made again on a new one, not
    INTERNAL "invalid connection pointer" (CI's short soak)."""
    c = LibvirtConnection("test:///default")
    closed: list[libvirt.virConnect] = []

    def lookup(conn: libvirt.virConnect) -> str:
        if not closed:  # the other thread's _drop, between get() and this use
            closed.append(conn)
            conn.close()
        return str(conn.lookupByName("test").name())

    try:
        assert c.call("VM test", lookup) == "test"
        assert c.get() is not closed[0]
    finally:
        c.close()


def test_unreachable_libvirtd_is_unavailable() -> None:
    c = LibvirtConnection("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(Unavailable) as info:
        c.get()
    assert "libvirtd" in info.value.message
    assert "qemu+unix:///system?socket=/nonexistent/libvirt-sock" in info.value.message
    with pytest.raises(Unavailable):
        c.lookup("agent-vm-x")


class FlakyDomain:
    """A domain whose first starts fail with the given errors."""

    def __init__(self, *errors: libvirt.libvirtError) -> None:
        self.errors = list(errors)
        self.starts: list[int] = []

    def name(self) -> str:
        return "agent-vm-flaky"

    def createWithFlags(self, flags: int) -> None:
        self.starts.append(flags)
        if self.errors:
            raise self.errors.pop(0)


EAGAIN = "failed to load cgroup BPF prog: Resource temporarily unavailable"


def test_launch_tries_again_after_a_transient_eagain() -> None:
    dom = FlakyDomain(
        libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, EAGAIN),
        libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, EAGAIN),
    )
    libvirt_conn.launch(dom, 7, pause=0)
    assert dom.starts == [7, 7, 7]


def test_launch_gives_up_on_eagain_after_its_attempts() -> None:
    dom = FlakyDomain(*(libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, EAGAIN) for _ in range(3)))
    with pytest.raises(libvirt.libvirtError) as raised:
        libvirt_conn.launch(dom, attempts=3, pause=0)
    assert raised.value.get_error_message() == EAGAIN
    assert len(dom.starts) == 3


def test_launch_raises_any_other_error_at_once() -> None:
    dom = FlakyDomain(libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "Cannot access storage file"))
    with pytest.raises(libvirt.libvirtError) as raised:
        libvirt_conn.launch(dom, pause=0)
    assert "storage file" in (raised.value.get_error_message() or "")
    assert len(dom.starts) == 1


def test_launch_starts_a_test_driver_domain() -> None:
    conn = libvirt.open(TEST_URI)
    try:
        dom = conn.lookupByName("test")
        dom.destroy()
        libvirt_conn.launch(dom)
        assert dom.isActive()
    finally:
        conn.close()


class CountingOpen:
    """libvirt.open that fails its first ``failures`` calls, as a restarting libvirtd."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.real = libvirt.open

    def __call__(self, uri: str) -> libvirt.virConnect:
        self.calls += 1
        if self.calls <= self.failures:
            raise libvirt.libvirtError("Failed to connect socket: No such file or directory")
        return self.real(uri)


def test_a_lost_connection_is_reopened_within_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libvirtd restarting: the caller waits for it instead of getting UNAVAILABLE."""
    c = LibvirtConnection("test:///default", reconnect_grace=30.0)
    first = c.get()
    c._drop(first)  # what call() does when the connection broke
    opener = CountingOpen(failures=3)
    monkeypatch.setattr(libvirt, "open", opener)
    monkeypatch.setattr("agentvm.vm_manager.libvirt_conn.RECONNECT_PAUSE_S", 0.01)
    again = c.get()
    assert again.isAlive()
    assert opener.calls == 4
    # Reopened: the next loss gets its own grace, and a good connection is reused.
    assert c.get() is again
    c.close()


def test_a_libvirtd_gone_past_the_grace_or_never_reached_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agentvm.vm_manager.libvirt_conn.RECONNECT_PAUSE_S", 0.01)
    never = CountingOpen(failures=10**6)
    monkeypatch.setattr(libvirt, "open", never)
    fresh = LibvirtConnection("test:///default", reconnect_grace=30.0)
    with pytest.raises(Unavailable, match="cannot connect to libvirt"):
        fresh.get()
    assert never.calls == 1  # never connected: no waiting for a libvirtd that may not exist
    monkeypatch.setattr(libvirt, "open", never.real)
    lost = LibvirtConnection("test:///default", reconnect_grace=0.2)
    lost._drop(lost.get())
    gone = CountingOpen(failures=10**6)
    monkeypatch.setattr(libvirt, "open", gone)
    with pytest.raises(Unavailable, match="Start libvirtd"):
        lost.get()
    assert gone.calls > 1  # tried again within its grace, then gave up
    calls = gone.calls
    with pytest.raises(Unavailable):
        lost.get()
    assert gone.calls == calls + 1  # past the grace: at once
