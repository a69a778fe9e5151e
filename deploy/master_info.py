"""``yr start``'s master info file: read it, and refuse a stale one.

``yr start`` writes ``<sessions>/yr_current_master_info`` (openyuanrong 9.9.9's
``write_old_current_master_info``; the SDK's ``yr.init`` reads the same keys) as one line::

    local_ip:10.0.0.5,master_ip:10.0.0.1,etcd_ip:10.0.0.1,etcd_port:22440,etcd_peer_port:22441,
    global_scheduler_port:22770,ds_master_port:12123,bus-proxy:22772,bus:22773,ds-worker:31501,

The file outlives the cluster: after a reboot, or a ``yr start`` whose processes died
without ``yr stop``, it still names a master nobody answers at. Since its mere presence
switches a deploy into cluster mode, it is checked: the master must accept a TCP connection
within a short timeout, or the deploy is refused with one line saying how to fix it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

MASTER_INFO_NAME = "yr_current_master_info"
CONNECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class MasterInfo:
    master_host: str  # master_ip
    master_port: int  # global_scheduler_port: the function master, what yr.init connects to
    local_host: str | None  # local_ip: this node
    ds_worker_port: int | None  # ds-worker: the data system worker port on the nodes

    @property
    def server_address(self) -> str:
        return f"{self.master_host}:{self.master_port}"

    @property
    def ds_address(self) -> str | None:
        """This node's data system worker, as yr.init would use it."""
        if self.local_host is None or self.ds_worker_port is None:
            return None
        return f"{self.local_host}:{self.ds_worker_port}"


def parse_master_info(text: str) -> MasterInfo:
    """Parse the ``key:value,key:value,...`` line; raise ValueError naming what is missing."""
    fields: dict[str, str] = {}
    for part in text.strip().split(","):
        key, sep, value = part.strip().partition(":")
        if sep and key and key not in fields:
            fields[key] = value.strip()
    if not fields.get("master_ip"):
        raise ValueError("no master_ip")
    return MasterInfo(
        master_host=fields["master_ip"],
        master_port=_port(fields, "global_scheduler_port", required=True),  # type: ignore[arg-type]
        local_host=fields.get("local_ip") or None,
        ds_worker_port=_port(fields, "ds-worker", required=False),
    )


def _port(fields: dict[str, str], key: str, required: bool) -> int | None:
    value = fields.get(key, "")
    if not value:
        if required:
            raise ValueError(f"no {key}")
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{key}:{value} is not a port")
    return int(value)


def tcp_answers(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def read_master_info(sessions_dir: Path, answers: Callable[[str, int], bool] = tcp_answers) -> MasterInfo | None:
    """The master ``yr start`` recorded, if the file exists and the master answers; None
    when there is no file (local mode). Raise ConfigError (one line) for an unreadable or
    stale file."""
    path = sessions_dir / MASTER_INFO_NAME
    if not path.is_file():
        return None
    fixes = ("if no openYuanrong cluster should be used, run 'yr stop' or remove the file; "
             "to use a cluster, set YR_SERVER_ADDRESS to its master's address")  # fmt: skip
    try:
        info = parse_master_info(path.read_text(errors="replace"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a master info file yr start wrote ({exc}); {fixes}") from None
    if not answers(info.master_host, info.master_port):
        raise ConfigError(f"{path} names an openYuanrong master at {info.server_address} that does not answer "
                          f"within {CONNECT_TIMEOUT_S:.0f} s (stale from an earlier yr start?); {fixes}")  # fmt: skip
    return info
