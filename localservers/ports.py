"""Loopback ports: pick a free one, check one, wait until something listens on one."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from localservers.process import ServerStartError, describe_exit, log_tail

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that nothing listens on right now (the OS picks it).

    There is an unavoidable window between this call and the server binding the port; callers start the server
    right away, and `ServerProcess.start` checks again just before launching.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind `host:port` (connections in TIME_WAIT do not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as every server sets it: only a live listener makes the port busy.
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
