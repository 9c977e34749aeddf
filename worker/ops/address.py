"""The address `--http` binds: HOST:PORT, [IPv6]:PORT, or a bare PORT on the loopback."""

from __future__ import annotations

import ipaddress


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from `text`; ValueError with a readable message otherwise."""
    raw = text.strip()
    if raw.isdigit():
        host, port_text = "127.0.0.1", raw
    elif raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        host, port_text = raw[1:end], raw[end + 2 :]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    else:
        raise ValueError(f"expected PORT, HOST:PORT or [IPv6]:PORT, got {text!r}")
    if not host:
        raise ValueError(f"no host in {text!r} (use 0.0.0.0:PORT for every interface)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the port must be a number from 1 to 65535, got {text!r}")
    if any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"not a host name or address: {host!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
