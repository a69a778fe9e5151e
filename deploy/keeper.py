"""The keeper: runs the deploy process (``deploy.serve``: front door and Controller) and
restarts it if it is killed, so that a crash of the door is never the end of the service.

``deploy`` starts this process in the background (its pid is ``deploy.pid``); it starts
``deploy.serve`` as its child. When the child is killed by a signal it did not ask for
(kill -9, the OOM killer) after the deployment became ready, the keeper starts it again
with ``--adopt``: the engines and data system workers it left still run, and the new
process takes them over (no model reload, KV kept) and opens the front door on the same
port. A child that exits by itself (stopped, or failed to start) is not restarted; nor
one killed more than ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S``. SIGTERM and
SIGINT are passed on to the child (it drains and stops everything), then the keeper exits
with its code. Local mode only: in cluster mode the detached Controller actor outlives
the deploy process, and a killed child ends the keeper.

    python -m deploy.keeper [deploy flags]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from common.errors import DeployError
from common.processes import read_pid
from deploy import config as config_module
from deploy.settings import add_arguments
from deploy.state import DeploymentState

logger = logging.getLogger("deploy.keeper")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
RESTART_DELAY_S = 1.0


class Keeper:
    def __init__(self, flags: Sequence[str], state_file: Path, pid_file: Path) -> None:
        self._flags = list(flags)
        self._state_file = state_file
        self._pid_file = pid_file
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._restarts: list[float] = []

    def stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM / SIGINT: the child stops everything; the keeper then exits."""
        self._stopping = True
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        adopt = False
        while True:
            command = [sys.executable, "-m", "deploy.serve", *self._flags, *(["--adopt"] if adopt else [])]
            self._child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
            if self._stopping:  # a signal came while it started
                self._child.send_signal(signal.SIGTERM)
            code = self._child.wait()
            if not self._should_restart(code):
                return code if code >= 0 else 128 - code
            logger.warning("the deploy process (pid %d) was killed by signal %d; restarting it in %.0f s to adopt "
                           "the engines and data system workers it left running", self._child.pid, -code,
                           RESTART_DELAY_S)  # fmt: skip
            time.sleep(RESTART_DELAY_S)
            if self._stopping:
                return 128 + signal.SIGTERM
            adopt = True

    def _should_restart(self, code: int) -> bool:
        if self._stopping or code >= 0:
            return False  # asked to stop, or it exited by itself (stopped, or failed to start)
        state = DeploymentState.read(self._state_file)
        if state is None or not state.engines or state.yr_mode != "local":
            logger.error("the deploy process was killed by signal %d %s; not restarting it", -code,
                         "before it was ready" if state is None or not state.engines else "(cluster mode)")  # fmt: skip
            return False
        now = time.monotonic()
        self._restarts = [at for at in self._restarts if now - at < RESTART_WINDOW_S] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            logger.error("the deploy process was killed %d times within %.0f s; giving up (run clean, then deploy)",
                         len(self._restarts), RESTART_WINDOW_S)  # fmt: skip
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    flags = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    parser = argparse.ArgumentParser(prog="deploy.keeper")
    add_arguments(parser)
    try:
        config = config_module.build_config(os.environ, parser.parse_args(flags))
    except DeployError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    keeper = Keeper(flags, config.state_file, config.pid_file)
    signal.signal(signal.SIGTERM, keeper.stop)
    signal.signal(signal.SIGINT, keeper.stop)
    try:
        return keeper.run()
    finally:
        if read_pid(config.pid_file) == os.getpid():
            config.pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
