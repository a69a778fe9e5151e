"""End to end: Ctrl-C (SIGINT) to ``deploy`` while its engines are still starting. The
CLI exits 130 saying what it did; no engine, data system worker or front door of the
deployment is left, its port is free again, and ``deploy`` right after works."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from common.processes import pid_alive, read_pid
from deploy.datasystem import worker_answers
from testkit.helpers import PROJECT_ROOT, SCRIPT, isolated_env, pids_matching, port_open, run_cli

pytestmark = pytest.mark.e2e


def _engine_pid_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "yr_sessions" / "latest" / "log").glob("*.pid"))


def test_ctrl_c_while_engines_start_stops_everything_and_deploy_works_after(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, PREFILL_STARTUP_PARAMS="--enforce-eager", DECODE_STARTUP_PARAMS="--enforce-eager")
    # A terminal's Ctrl-C finds SIGINT at its default; a runner that started these tests in
    # the background (bash `cmd &` without job control) passes it on ignored, and Python
    # then never raises KeyboardInterrupt: give the CLI the terminal's disposition.
    cli = subprocess.Popen(["bash", str(SCRIPT), "deploy"], env=env, cwd=PROJECT_ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while len(_engine_pid_files(tmp_path)) < 2 and time.monotonic() < deadline and cli.poll() is None:
            time.sleep(0.2)
        engine_pids = [read_pid(path) for path in _engine_pid_files(tmp_path)]
        assert len(engine_pids) == 2 and all(pid is not None and pid_alive(pid) for pid in engine_pids)
        assert not port_open(int(env["SERVER_PORT"]))  # not ready yet: the engines are loading
        cli.send_signal(signal.SIGINT)
        output, _ = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        run_cli("clean", env, timeout=300)
    assert cli.returncode == 130, output
    assert output.rstrip().splitlines()[-1] == "interrupted; what deploy started was stopped"
    assert [pid for pid in engine_pids if pid is not None and pid_alive(pid)] == []
    assert pids_matching(str(tmp_path)) == []
    assert not worker_answers(env["DS_WORKER_ADDRESS"])  # the worker deploy started is stopped
    assert not (tmp_path / "run" / "deploy.pid").exists()

    again = run_cli("deploy", env, timeout=900)
    try:
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        run_cli("clean", env, timeout=300)
