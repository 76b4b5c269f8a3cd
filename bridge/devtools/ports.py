"""Pick a free TCP port on the loopback interface for local test and demo servers."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port", "port_is_free"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now and was not handed out before.

    Ports come from below the kernel's ephemeral range: a port the kernel picks for ``bind(0)``
    is one it also gives outgoing connections, so under heavy HTTP traffic (a test suite) the
    port could be taken between this call and the server's own bind. The port is released
    before returning; another process choosing the very same one meanwhile stays possible, but
    is unlikely (random among thousands).
    """
    low, high = _below_ephemeral()
    for _ in range(500):
        port = random.randint(low, high)
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all taken: the kernel's
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


_handed_out: set[int] = set()


def _below_ephemeral() -> tuple[int, int]:
    """Ports under the kernel's ephemeral range (Linux: ip_local_port_range), at least 10000."""
    first_ephemeral = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    high = max(first_ephemeral - 1, 12000)
    return min(10000, high - 2000), high


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
