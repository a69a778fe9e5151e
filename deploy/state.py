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
