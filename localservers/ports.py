"""Loopback ports: pick a free one, check one, wait until something listens on one."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from pathlib import Path

from localservers.process import ServerStartError, describe_exit, log_tail

LOOPBACK = "127.0.0.1"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Listening ports are drawn from here, below the kernel's ephemeral range: the OS hands ports in that range to
# outgoing connections, so a port picked there can be taken by some client's connection before the server binds it.
LOWEST_LISTEN_PORT = 10000
FALLBACK_EPHEMERAL_START = 32768  # Linux's default when the range cannot be read
_PICK_ATTEMPTS = 200

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def ephemeral_range_start() -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections get their local ports)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_START


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that nothing listens on right now, outside the ephemeral range.

    Picked at random between LOWEST_LISTEN_PORT and the start of the ephemeral range, and never the same port twice
    in one process (a cluster picks all its ports before starting its first node). There is still a window between
    this call and the server binding the port; callers start the server right away, and `ServerProcess.start`
    checks again just before launching. When no such range exists, the OS picks (port 0).
    """
    ceiling = ephemeral_range_start()
    if ceiling - LOWEST_LISTEN_PORT >= _PICK_ATTEMPTS:
        with _handed_out_lock:
            for _ in range(_PICK_ATTEMPTS):
                port = random.randrange(LOWEST_LISTEN_PORT, ceiling)
                # Without SO_REUSEADDR: skip ports any socket holds, even a closing connection's.
                if port not in _handed_out and port_is_free(host, port, reuse=False):
                    _handed_out.add(port)
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def port_is_free(host: str, port: int, *, reuse: bool = True) -> bool:
    """True when a listener could bind `host:port`.

    With `reuse` (SO_REUSEADDR, as every server sets it) only a live listener makes the port busy, not connections
    in TIME_WAIT; without it any socket bound to the port does, an outgoing connection's included.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port); an empty host means loopback."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll until a TCP connection to `host:port` succeeds, for at most `timeout` seconds.

    `what` names the thing waited for in the error. When `process` is given and it exits meanwhile, fail at
    once with its exit code and the tail of `log_path`, instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise ServerStartError(describe_exit(what, process, log_path))
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what} to listen on {host}:{port}"
            message += f" (last error: {last_error})"
            if log_path is not None:
                message += f"; last lines of {log_path}:\n{log_tail(log_path)}"
            raise ServerStartError(message)
        time.sleep(0.05)
