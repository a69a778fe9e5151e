"""vLLM's ``--kv-events-config`` for an engine, and where the door finds its events
(pure functions).

Ports: each engine needs two, reserved by whoever picks its HTTP port (the engine
actor's ``free_port``): ``port`` for the PUB socket that publishes every scheduler
step's KV events, ``port + 1`` (or ``replay_port``) for the ROUTER socket that replays
the last ``buffer_steps`` batches to a subscriber that missed some.

Binding: both sockets listen on ``bind_host`` alone (loopback in local mode, the node's
address in cluster mode), never on every interface: ``BlockStored`` events carry the
prompts' token ids. vLLM binds the PUB endpoint only when it contains ``*`` or ``::``
(any other address makes it *connect*), so an IPv4 address is written IPv4-mapped,
``tcp://[::ffff:127.0.0.1]:port``: vLLM sees ``::`` and binds, and libzmq binds the IPv4
address itself (measured with pyzmq 27: ``LAST_ENDPOINT`` is ``tcp://127.0.0.1:port``, and
the socket listens on 127.0.0.1 only). An IPv6 address cannot be bound (vLLM sets no
IPv6 option on the socket). The replay endpoint is always bound as given. The topic is
the engine's name: the door subscribes to all engines on one socket and tells them apart
by topic.

vLLM also reports the endpoints it bound at ``GET /kv_event_sources`` (by DP rank), and
offsets both ports by the data-parallel rank when an engine runs DP ranks itself (ours
run one rank per engine, so no offset).
"""

from __future__ import annotations

import ipaddress
import json

DEFAULT_BUFFER_STEPS = 10_000  # vLLM's default: batches (scheduler steps) kept for replay


def kv_events_config(
    port: int,
    topic: str,
    bind_host: str = "127.0.0.1",
    replay_port: int | None = None,
    buffer_steps: int = DEFAULT_BUFFER_STEPS,
) -> dict[str, object]:
    """The ``--kv-events-config`` object of an engine publishing on ``port``."""
    if not 0 < port < 65535:
        raise ValueError(f"kv events port={port}: must be 1-65534 (the replay socket takes port + 1)")
    if not topic:
        raise ValueError("kv events topic is empty: use the engine's name, which the door routes events by")
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": pub_bind_endpoint(bind_host, port),
        "replay_endpoint": f"tcp://{bind_host}:{replay_port if replay_port is not None else port + 1}",
        "buffer_steps": buffer_steps,
        "topic": topic,
    }


def pub_bind_endpoint(host: str, port: int) -> str:
    """The PUB endpoint vLLM binds on ``host`` alone (module docstring)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"kv events bind host {host}: must be an IPv4 address of this node") from None
    if address.version != 4 or address.is_unspecified:
        raise ValueError(f"kv events bind host {host}: must be an IPv4 address of this node, not a wildcard or IPv6 "
                         "(vLLM 0.32 binds its PUB socket on IPv4 or on every interface)")  # fmt: skip
    return f"tcp://[::ffff:{host}]:{port}"


def kv_events_args(port: int, topic: str, bind_host: str = "127.0.0.1", replay_port: int | None = None) -> list[str]:
    """The vLLM arguments that turn an engine's KV events on."""
    config = kv_events_config(port, topic, bind_host, replay_port)
    return ["--kv-events-config", json.dumps(config, separators=(",", ":"))]


def event_endpoints(host: str, port: int, replay_port: int | None = None) -> tuple[str, str]:
    """Where a subscriber connects for an engine on ``host``: (PUB, replay)."""
    return f"tcp://{host}:{port}", f"tcp://{host}:{replay_port if replay_port is not None else port + 1}"
