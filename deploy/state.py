"""state.json: what a running deployment is made of, for status and clean."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The line deploy/serve.py logs when the front door starts; the CLI waits for it.
READY_MARKER = "front door ready at"


@dataclass
class DeploymentState:
    pid: int
    endpoint: str
    yr_mode: str
    served_model_name: str
    ds_worker_address: str  # comma-separated when deploy started several local workers
    ds_started_here: bool
    log_dir: str
    engines: list[dict[str, object]] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(asdict(self), indent=2))
        os.replace(staging, path)

    @staticmethod
    def read(path: Path) -> DeploymentState | None:
        try:
            return DeploymentState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22): with the
    pid, this names one process; a pid reused by another process has another start."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def write_pid(path: Path, pid: int) -> None:
    """Record ``pid`` with its start time, so a later reader cannot mistake a new process
    that got the same pid for it (and signal it)."""
    path.write_text(f"{pid} {process_start_ticks(pid) or 0}\n")


def read_pid(path: Path) -> int | None:
    """The recorded process's pid while that very process runs; None when the file is
    missing or the pid now belongs to another process (or to none)."""
    try:
        fields = path.read_text().split()
        pid = int(fields[0])
        recorded_start = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    if recorded_start and process_start_ticks(pid) != recorded_start:
        return None
    return pid


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
