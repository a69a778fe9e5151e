"""Naming one process safely: a pid with its start time, so that a pid the kernel gave
to another process since is never mistaken for it (and never signalled)."""

from __future__ import annotations

import os
from pathlib import Path


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
