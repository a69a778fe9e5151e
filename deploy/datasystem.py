"""A data system worker that deploy starts itself in local mode (and clean stops)."""

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


def start_worker(settings: DataSystemConfig, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    argv = [
        dscli_path(), "start", "-d", str(home), "-w",
        "--worker_address", settings.address,
        "--metastore_address", f"{settings.worker_host}:{settings.metastore_port}",
        "--start_metastore_service", "true",
        "--shared_memory_size_mb", str(settings.shared_memory_mb),
    ]  # fmt: skip
    if settings.spill_dir is not None:
        settings.spill_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--spill_directory", str(settings.spill_dir), "--spill_size_limit", str(settings.spill_size_mb * 1024 * 1024)]
    logger.info("starting data system worker at %s (shared memory %d MB, home %s)", settings.address, settings.shared_memory_mb, home)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_clean_env())
    if result.returncode != 0 or "success" not in result.stdout:
        raise StartupError(
            f"data system worker at {settings.address} did not start (dscli rc={result.returncode}): "
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
