"""Data system workers that deploy starts itself in local mode (and clean stops).

The first worker also runs the metastore; the others join it, so all of them form one
cluster: a block stored through one worker is readable through any other."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.config import DataSystemConfig
from deploy.errors import StartupError

logger = logging.getLogger(__name__)


def dscli_path() -> str:
    beside_python = Path(sys.executable).parent / "dscli"
    return str(beside_python) if beside_python.exists() else (shutil.which("dscli") or "dscli")


def start_workers(settings: DataSystemConfig, home: Path) -> None:
    """Start every local worker; on failure, stop those already started and raise."""
    started: list[str] = []
    try:
        for index, address in enumerate(settings.addresses):
            folder = home if index == 0 else home / f"worker-{index}"
            start_worker(settings, folder, address=address, runs_metastore=index == 0)
            started.append(address)
    except BaseException:
        for address in started:
            stop_worker(address)
        raise


def start_worker(settings: DataSystemConfig, home: Path, address: str | None = None, runs_metastore: bool = True) -> None:
    address = address or settings.address
    home.mkdir(parents=True, exist_ok=True)
    argv = [
        dscli_path(), "start", "-d", str(home), "-w",
        "--worker_address", address,
        "--metastore_address", f"{settings.worker_host}:{settings.metastore_port}",
        "--start_metastore_service", "true" if runs_metastore else "false",
        "--shared_memory_size_mb", str(settings.shared_memory_mb),
    ]  # fmt: skip
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
