"""Data system workers that deploy starts itself in local mode (and clean stops).

The first worker also runs the metastore; the others join it, so all of them form one
cluster: a block stored through one worker is readable through any other."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common.config import DataSystemConfig
from common.errors import StartupError
from deploy.master_info import tcp_answers
from patch.yuanrong_connector.sdk_threads import calm_sdk_threads

logger = logging.getLogger(__name__)


def dscli_path() -> str:
    beside_python = Path(sys.executable).parent / "dscli"
    return str(beside_python) if beside_python.exists() else (shutil.which("dscli") or "dscli")


# The worker puts unix sockets at <home>/datasystem/uds/<8 hex>/ (the longest name is
# exclusiveConn), and Linux refuses socket paths over 107 bytes: the worker then dies
# after a minute of retries ("len(109) is greater than linux max socket len(108)").
_SOCKET_SUFFIX_LEN = len("/datasystem/uds/01234567/exclusiveConn")
_MAX_SOCKET_PATH = 107


def worker_home(preferred: Path, address: str) -> Path:
    """``preferred``, or a short folder under /tmp when the worker's socket path would not fit."""
    if len(str(preferred.resolve())) + _SOCKET_SUFFIX_LEN <= _MAX_SOCKET_PATH:
        return preferred
    short = Path(tempfile.gettempdir()) / f"yr-ds-{address.replace(':', '-')}"
    logger.info("data system home %s is too long for the worker's socket path; using %s", preferred, short)
    return short


# The worker raises its ZeroMQ IO threads to nice -15 by default (``io_thread_nice``).
# On a CPU host those threads, busy with the engines' requests, then take a core from the
# engines whose KV they serve: measured on 2 cores (1P1D, 36 concurrent long prompts),
# the machine stopped answering for 40-80 s at a time and both engines were declared
# unhealthy. At 0 they share the CPU like any process (engines run at CPU_ENGINE_NICENESS).
IO_THREAD_NICE = 0


def worker_answers(address: str, timeout_ms: int = 2000) -> bool:
    """Whether a data system worker answers at ``address`` (a client can connect)."""
    host, _, port = address.rpartition(":")
    try:
        from yr.datasystem import KVClient

        client = KVClient(host, int(port), connect_timeout_ms=timeout_ms, req_timeout_ms=timeout_ms)
        client.init()
    except Exception:
        return False
    finally:
        calm_sdk_threads()  # the SDK's IO threads of this process (the door's) run at nice -15
    return True


WORKER_PROBE_TIMEOUT_S = 1.0


def worker_listens(address: str, timeout_s: float = WORKER_PROBE_TIMEOUT_S) -> bool:
    """Whether the data system worker at ``address`` (host:port) accepts a TCP connection:
    the cheap probe ``status`` uses (``worker_answers`` starts an SDK client and its threads)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    return tcp_answers(host.strip("[]"), int(port), timeout_s)


def start_workers(settings: DataSystemConfig, home: Path) -> None:
    """Start every local worker; on failure, stop those already started and raise."""
    started: list[str] = []
    try:
        for index, address in enumerate(settings.addresses):
            folder = worker_home(home if index == 0 else home / f"worker-{index}", address)
            start_worker(settings, folder, address=address, runs_metastore=index == 0)
            started.append(address)
    except BaseException:
        stop_workers(started)
        raise


def stop_workers(addresses: Sequence[str]) -> list[str]:
    """Stop workers in reverse start order (a worker that joins the first one's metastore
    must go before it: stopping the metastore's worker first hangs); return those stopped."""
    return [address for address in reversed(list(addresses)) if stop_worker(address)]


def start_worker(settings: DataSystemConfig, home: Path, address: str | None = None, runs_metastore: bool = True) -> None:
    address = address or settings.address
    home.mkdir(parents=True, exist_ok=True)
    argv = [
        dscli_path(), "start", "-d", str(home), "-w",
        "--worker_address", address,
        "--metastore_address", f"{settings.worker_host}:{settings.metastore_port}",
        "--start_metastore_service", "true" if runs_metastore else "false",
        "--shared_memory_size_mb", str(settings.shared_memory_mb),
        "--io_thread_nice", str(IO_THREAD_NICE),
    ]  # fmt: skip
    if settings.populate_shared_memory:  # the worker populates only one arena, and not with fallocate
        argv += ["--shared_memory_populate", "true", "--arena_per_tenant", "1", "--enable_fallocate", "false"]
    if settings.spill_dir is not None:
        spill_dir = settings.spill_dir / address.replace(":", "_")
        spill_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--spill_directory", str(spill_dir), "--spill_size_limit", str(settings.spill_size_mb * 1024 * 1024)]
    logger.info(
        "starting data system worker at %s (shared memory %d MB, spill %s, home %s)",
        address, settings.shared_memory_mb, settings.spill_dir or "off", home,
    )  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_clean_env())
    if result.returncode != 0 or "success" not in result.stdout:
        raise StartupError(
            f"data system worker at {address} did not start (dscli rc={result.returncode}): "
            f"{(result.stdout + result.stderr).strip().splitlines()[-1:] or ''}; logs in {home}"
        )


def stop_worker(address: str) -> bool:
    """Stop the worker at ``address``; return whether dscli reported it stopped."""
    result = subprocess.run([dscli_path(), "stop", "-w", address], capture_output=True, text=True, timeout=120, env=_clean_env())
    stopped = result.returncode == 0
    logger.info("data system worker at %s %s", address, "stopped" if stopped else "was not running")
    return stopped


def _clean_env() -> dict[str, str]:
    # The worker must not inherit LD_LIBRARY_PATH entries meant for other libraries.
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    return env
