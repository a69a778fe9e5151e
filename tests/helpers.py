"""Shared test helpers: free ports, running the project's own CLI, finding processes."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "run_vllm_on_yr.sh"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0
