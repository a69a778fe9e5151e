"""This node's address as other nodes reach it.

``gethostbyname(gethostname())`` is often 127.0.1.1 (Debian and Ubuntu map the host name
to it in /etc/hosts), which no other node can reach. The kernel knows better: the source
address of a UDP socket "connected" toward a peer (the openYuanrong master) is the
address of the interface that routes there. Connecting a UDP socket sends no packet.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger(__name__)

_DISCARD_PORT = 9  # any port: a UDP connect sends nothing


def udp_source_address(peer_host: str) -> str:
    """The local address the kernel would send from toward ``peer_host`` (raises OSError)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(peer_host, _DISCARD_PORT, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(sockaddr)
        return str(probe.getsockname()[0])


def hostname_address() -> str:
    return socket.gethostbyname(socket.gethostname())


def routable_address(
    peer_host: str,
    source_toward: Callable[[str], str] = udp_source_address,
    fallback: Callable[[], str] = hostname_address,
) -> str:
    """The address of the interface that routes toward ``peer_host`` (the master or another
    node); when there is no peer or no route, the host name's address, with a warning."""
    reason = "no peer address to route toward"
    if peer_host:
        try:
            address = source_toward(peer_host)
            if not ipaddress.ip_address(address).is_unspecified:
                return address
            reason = f"the route toward {peer_host} gave {address}"
        except (OSError, ValueError) as exc:
            reason = f"no route toward {peer_host} ({exc})"
    address = fallback()
    unreachable = ipaddress.ip_address(address).is_loopback and not _is_loopback(peer_host)
    logger.warning("node address: %s; using the host name's address %s%s", reason, address,
                   ", which other nodes cannot reach" if unreachable else "")  # fmt: skip
    return address


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def host_of(address: str) -> str:
    """The host of ``host:port``, ``http://host:port`` or ``[v6]:port``."""
    address = address.split("://", 1)[-1].split("/", 1)[0]
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]") or address
