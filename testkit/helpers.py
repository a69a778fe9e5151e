"""Shared test helpers: free ports, running the project's own CLI, finding processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.config import Accelerator, Role, ServiceConfig
from deploy.config import build_config
from workers.engine_process import EngineSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "run_vllm_on_yr.sh"


# Ports for test servers come from below Linux's ephemeral range (32768-60999), which
# outgoing connections draw from: a port picked there can be taken by a client's socket
# before the server binds it (seen: "address already in use" under a busy suite).
_TEST_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, not handed out before by this process."""
    for _ in range(1000):
        port = random.choice(_TEST_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_TEST_PORTS.start}-{_TEST_PORTS.stop - 1}")


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``condition`` until it is true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(interval_s)


def service_config(**settings: str) -> ServiceConfig:
    """A deployment's configuration as deploy builds it from ``settings`` (environment
    names) and defaults, on CPU, reading no session of this machine's."""
    environ = {"ACCELERATOR": "cpu", "YR_SESSIONS_DIR": str(PROJECT_ROOT / ".cache" / "no-sessions"), **settings}
    return build_config(environ)


def isolated_env(tmp: Path, **settings: str) -> dict[str, str]:
    """The environment of a deployment that shares nothing with a developer's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "YR_SERVER_ADDRESS")}
    env.update(
        RUN_DIR=str(tmp / "run"),
        YR_SESSIONS_DIR=str(tmp / "yr_sessions"),
        MODEL_CACHE_DIR=str(PROJECT_ROOT / ".cache" / "models"),
        SERVER_PORT=str(free_port()),
        DS_WORKER_ADDRESS=f"127.0.0.1:{free_port()}",
        DS_METASTORE_PORT=str(free_port()),
        DS_SHARED_MEMORY_MB="512",
    )
    env.update(settings)
    return env


def run_cli(verb: str, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), verb, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT
    )


def pids_matching(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def freeze(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped. The signal is
    delivered asynchronously: on a busy host a thread can still answer a call made right
    after ``kill`` (seen in CI: a "frozen" worker answered ``exist``)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not all(_thread_state(task) in ("T", "t", None) for task in Path(f"/proc/{pid}/task").glob("*")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout_s} s of SIGSTOP")
        time.sleep(0.002)


def _thread_state(task: Path) -> str | None:
    """A thread's state letter from its /proc stat line; None once it is gone."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def cluster_engine_spec(**fields: Any) -> EngineSpec:
    """A TP=2 CUDA decode engine as cluster mode builds it (the runtime places it and picks
    its devices), with ``fields`` replaced."""
    base: dict[str, Any] = dict(
        name="decode-0", instance="decode-0", role=Role.DECODE, accelerator=Accelerator.CUDA, tensor_parallel=2,
        devices=(), model_path="m", served_model_name="m", startup_params=(), ds_worker_address=":31501",
        prefix_reuse=False, project_root="/p", cache_root="/c", cpu_kvcache_gb=1, runtime_placed=True,
    )  # fmt: skip
    base.update(fields)
    return EngineSpec(**base)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (read from /proc now)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds open
    (IPv4 and IPv6, from /proc: a probe by connecting could reach another process's
    socket, or connect to itself when nothing listens)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return {(address, port) for address, port, state, inode in _tcp_sockets() if state == "0A" and inode in inodes}  # 0A: LISTEN


def connections_accepted_on(port: int) -> int:
    """How many TCP connections to local ``port`` are established (from /proc; any process)."""
    return sum(1 for _, local_port, state, _ in _tcp_sockets() if state == "01" and local_port == port)  # 01: ESTABLISHED


def _tcp_sockets() -> Iterator[tuple[str, int, str, str]]:
    """(local address, local port, state in hex, inode) of every TCP socket, IPv4 and IPv6."""
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port = fields[1].split(":")
            yield _proc_address(address, width), int(port, 16), fields[3], fields[9]


def _proc_address(hex_address: str, width: int) -> str:
    """/proc/net/tcp's address notation (little-endian 32-bit words) as text."""
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, width, 8))
    return socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw)
