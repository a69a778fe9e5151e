"""End to end, PD-colocated (DECODE_INS_NUM=0): one kv_both instance serves requests
itself. Its greedy outputs are recorded for test_e2e_pd to compare PD against."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.processes import pid_alive
from testkit.deployment import PROMPT_LENGTHS, Deployment, complete, deployed, token_prompt
from testkit.helpers import PROJECT_ROOT, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def colocated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # DOOR_READ_TIMEOUT_S=3: the attack command's short variant waits that long for its slowloris clients.
    with deployed(tmp_path_factory.mktemp("colocated"), DECODE_INS_NUM="0", PREFILL_INS_NUM="1", DOOR_READ_TIMEOUT_S="3") as running:
        yield running


def test_one_colocated_instance_serves(colocated: Deployment, colocated_outputs: dict[int, dict[str, object]]) -> None:
    status = run_cli("status", colocated.env, timeout=120)
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("colocated-")]
    assert [(row[0], row[1], row[5]) for row in rows] == [("colocated-0", "colocated", "healthy")]
    for length in PROMPT_LENGTHS:
        body = {"prompt": token_prompt(length), "max_tokens": 12, "temperature": 0}
        choice = complete(colocated.url, body)["choices"][0]  # type: ignore[index]
        assert choice["finish_reason"] == "length"
        colocated_outputs[length] = choice


def test_two_deployments_side_by_side_keep_to_themselves(colocated: Deployment, tmp_path: Path) -> None:
    """A second deployment on other ports, sharing the first one's sessions folder (as two
    checkouts share /tmp/yr_sessions): each has its own session; status and logs show
    only their own engines; cleaning the second leaves the first serving."""
    sessions = colocated.env["YR_SESSIONS_DIR"]
    first_pid = int(colocated.state.engines[0]["pid"])  # type: ignore[call-overload]
    with deployed(tmp_path / "second", YR_SESSIONS_DIR=sessions, DECODE_INS_NUM="0", PREFILL_INS_NUM="1") as second:
        second_pid = int(second.state.engines[0]["pid"])  # type: ignore[call-overload]
        assert Path(second.state.log_dir).parent != Path(colocated.state.log_dir).parent
        assert Path(second.state.log_dir).parent.parent == Path(sessions)
        assert (Path(sessions) / "latest").resolve() == Path(second.state.log_dir).parent.resolve()  # the newest
        for deployment, own, other in ((colocated, first_pid, second_pid), (second, second_pid, first_pid)):
            status = run_cli("status", deployment.env, timeout=120).stdout
            logs = run_cli("logs", deployment.env, "-n", "1", timeout=120).stdout
            assert f" {own} " in status and f" {other} " not in status
            engine_logs = [line for line in logs.splitlines() if line.startswith("==> ") and "colocated-0.log" in line]
            assert engine_logs == [f"==> {deployment.state.log_dir}/colocated-0.log <=="]
    assert run_cli("status", second.env, timeout=120).returncode == 1  # the second is gone...
    assert pid_alive(first_pid) and not pid_alive(second_pid)
    complete(colocated.url, {"prompt": token_prompt(20), "max_tokens": 2})  # ...the first serves on


def test_the_door_withstands_the_attack_command(colocated: Deployment) -> None:
    """The short variant of ``python -m tests.door_attack``: 20 slowloris connections, 2
    pipelining floods of 10 x 1 MiB, 260 malformed requests (20 of each kind), while a
    normal client goes on. Latency is reported, not judged, here (a shared 2-core box)."""
    command = [sys.executable, "-m", "tests.door_attack", "--url", colocated.url, "--door-pid", str(colocated.state.pid),
               "--read-timeout-s", "3", "--slowloris", "20", "--floods", "2", "--pipelined", "10", "--malformed", "260",
               "--probes", "10", "--p99-limit", "0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| slowloris connections closed by the door | | 20 of 20," in result.stdout
    assert result.stdout.splitlines()[-1] == "passed"
