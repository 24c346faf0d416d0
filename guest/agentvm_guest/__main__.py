"""Entry point of the guest agent (started by the guest's init at boot).

Serves GuestAgentService on a local Unix socket, and makes it reachable from
the host over virtio-vsock (one connection per host stream) when the VM has
a vsock device, and over the virtio-serial port (multiplexed, see mux.py)
when it has that port.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import sys
import threading
import time

from agentvm_guest import __version__, confine, mux, spawner, sysinit
from agentvm_guest.relay import GuestRelay, find_port
from agentvm_guest.splice import serve_accepted

SOCKET_PATH = "/run/agentvm/agent.sock"


def started_at() -> float:
    """Seconds after boot at which this process started (its /proc stat), or -1."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


def main() -> int:
    imported = time.monotonic()  # CLOCK_MONOTONIC: seconds since boot
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="agentvm-agent: %(levelname)s %(message)s"
    )
    log = logging.getLogger("agentvm_guest")
    if "--boot" in sys.argv[1:]:  # the VM's own agent, started by init (agentvm-agent)
        sysinit.run()
    set_up = time.monotonic()
    confine.shield_agent()
    # Forked while this process is small and has one thread: it starts every
    # program, so the agent (gRPC, its threads) never forks (spawner.py).
    spawner.start()
    from agentvm_guest.agent import connect_unix, serve  # gRPC: after the fork

    os.makedirs(os.path.dirname(SOCKET_PATH), mode=0o700, exist_ok=True)
    if os.path.exists(SOCKET_PATH):
        os.unlink(SOCKET_PATH)
    server = serve("unix:" + SOCKET_PATH)
    os.chmod(SOCKET_PATH, 0o600)

    def connect() -> socket.socket:
        return connect_unix(SOCKET_PATH)

    if glob.glob("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*"):
        try:
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, mux.VSOCK_PORT))
            listener.listen(64)
        except OSError as exc:
            log.info("no vsock transport: %s", exc)
        else:
            threading.Thread(target=serve_accepted, args=(listener, connect), daemon=True).start()
            log.info("listening on vsock port %d", mux.VSOCK_PORT)

    port = None
    for _ in range(200):
        port = find_port()
        if port:
            break
        time.sleep(0.05)
    log.info(
        "agent %s serving (virtio-serial port: %s); seconds after boot: started %.2f, "
        "imported %.2f, set up %.2f, serving %.2f",
        __version__,
        port or "none",
        started_at(),
        imported,
        set_up,
        time.monotonic(),
    )
    if port is None:
        server.wait_for_termination()
        return 0
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    GuestRelay(fd, connect).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
