"""A deployment made by the project's own CLI for a benchmark, always cleaned after."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from deploy.state import DeploymentState
from testkit.helpers import run_cli


@contextmanager
def deployed(env: dict[str, str]) -> Iterator[DeploymentState]:
    """``run_vllm_on_yr.sh deploy`` with ``env``; ``clean`` when the block ends, whatever happened."""
    try:
        result = run_cli("deploy", env, timeout=1200)
        if result.returncode != 0:
            raise SystemExit(result.stdout + result.stderr)
        state = DeploymentState.read(Path(env["RUN_DIR"]) / "state.json")
        if state is None:
            raise SystemExit(f"deploy reported ready but wrote no state.json in {env['RUN_DIR']}")
        yield state
    finally:
        run_cli("clean", env, timeout=300)


def exit_on_sigterm() -> None:
    """SIGTERM ends this benchmark as an exception does: through every ``finally`` (the
    deployments', the routers'), so a stopped benchmark leaves nothing running."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
