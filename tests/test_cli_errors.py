"""Bad configuration through the real CLI: one clear line, exit 2, nothing started."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from testkit.helpers import isolated_env, pids_matching, run_cli


def _assert_refused(tmp_path: Path, result_stderr: str, returncode: int, expected: str) -> None:
    assert returncode == 2
    lines = [line for line in result_stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result_stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "run" / "deploy.pid").exists()
    assert not pids_matching(str(tmp_path))  # nothing of this deployment is running


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"PTP": "0"}, "PTP=0 is invalid: must be an integer >= 1"),
        ({"PREFILL_INS_NUM": "-1"}, "PREFILL_INS_NUM=-1 is invalid: must be an integer >= 1"),
        ({"MODEL_PATH": "/nowhere/at/all"}, "MODEL_PATH=/nowhere/at/all is invalid"),
        ({"PREFILL_STARTUP_PARAMS": "--port 1234"}, "contains --port, which the deployment sets itself"),
    ],
)
def test_bad_config_is_refused_before_anything_starts(tmp_path: Path, settings: dict[str, str], expected: str) -> None:
    result = run_cli("deploy", isolated_env(tmp_path, **settings), timeout=120)
    _assert_refused(tmp_path, result.stderr, result.returncode, expected)


def test_taken_server_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("deploy", isolated_env(tmp_path, SERVER_PORT=str(port)), timeout=120)
    _assert_refused(tmp_path, result.stderr, result.returncode, f"SERVER_PORT={port} is invalid: 127.0.0.1:{port} is already in use")


def test_unknown_verb_is_refused(tmp_path: Path) -> None:
    result = run_cli("launch", isolated_env(tmp_path), timeout=60)
    assert result.returncode == 2 and "unknown verb 'launch'" in result.stderr


def test_unknown_benchmark_is_refused(tmp_path: Path) -> None:
    result = run_cli("bench", isolated_env(tmp_path), "seed001", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown experiment 'seed001': must be one of seed000, seed002, seed003, pd-handoff, connector-io, checksum-cost, load-floor, cuda-staging, "
        "door-overhead, prefix-affinity, selective-pd, kv-index-scale, soak, sdk-gil, calibrate, sim-fidelity, sim-routing, "
        "adaptive-roles, adaptive-ramp, sim-scale"
    ]


def test_status_and_clean_without_a_deployment(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    status = run_cli("status", env, timeout=120)
    assert status.returncode == 1 and "no deployment is running" in status.stdout
    clean = run_cli("clean", env, timeout=120)
    assert clean.returncode == 0 and "nothing was running" in clean.stdout


def test_a_port_left_in_time_wait_by_a_stopped_door_is_free() -> None:
    from deploy.cli import check_port_free

    with socket.socket() as listener:  # a door's listener, as Uvicorn opens it
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end stays in TIME_WAIT
        assert client.recv(1) == b""  # its FIN arrived
        client.close()
    check_port_free("127.0.0.1", port)  # as `deploy` right after `clean` does: no error


def _recorded_session(tmp_path: Path) -> Path:
    """The session log folder a deployment in ``tmp_path`` recorded in its state.json."""
    from deploy.state import DeploymentState

    log_dir = tmp_path / "yr_sessions" / "vllm-20261205-000000-1" / "log"
    log_dir.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    DeploymentState(pid=999999999, endpoint="http://127.0.0.1:1", yr_mode="local", served_model_name="m",
                    ds_worker_address="127.0.0.1:1", ds_started_here=False, log_dir=str(log_dir)).write(tmp_path / "run" / "state.json")  # fmt: skip
    return log_dir


def test_clean_spares_a_process_that_reused_a_recorded_engine_pid(tmp_path: Path) -> None:
    from common.processes import process_start_ticks

    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)  # not ours: its own process group
    try:
        log_dir = _recorded_session(tmp_path)
        start = process_start_ticks(bystander.pid)
        assert start is not None
        # A leftover pid file whose engine is long gone; the pid now belongs to the bystander.
        (log_dir / "decode-0-dp0.pid").write_text(f"{bystander.pid} {start - 1}\n")

        result = run_cli("clean", isolated_env(tmp_path), timeout=60)

        assert result.returncode == 0 and "stopping engine" not in result.stdout
        assert bystander.poll() is None  # still running
        assert not (log_dir / "decode-0-dp0.pid").exists()  # the stale file is gone
    finally:
        bystander.kill()
        bystander.wait()


def test_status_tells_of_engines_left_running_by_a_dead_deploy_process(tmp_path: Path) -> None:
    from common.processes import write_pid

    engine = subprocess.Popen(["sleep", "120"], start_new_session=True)  # stands for an engine left running
    try:
        log_dir = _recorded_session(tmp_path)
        write_pid(log_dir / "decode-0-dp0.pid", engine.pid)
        (tmp_path / "run" / "deploy.pid").write_text("999999999 1\n")  # the deploy process, killed

        result = run_cli("status", isolated_env(tmp_path), timeout=60)

        assert result.returncode == 1
        assert result.stdout.strip() == (
            f"the deploy process is gone (front door and Controller down), but engines still run: decode-0-dp0 "
            f"(pid {engine.pid}); stop them with: bash run_vllm_on_yr.sh clean"
        )
    finally:
        engine.kill()
        engine.wait()


_SCALE_USAGE = "usage: bash run_vllm_on_yr.sh scale <prefill|decode|colocated> <+N|-N>"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("decode", "0"), "error: scale count '0' is invalid: must be +N or -N with N from 1 to 8 (+1 adds an instance, "
                          "-1 drains and removes one)"),
        (("decode", "+9"), "error: scale count '+9' is invalid: must be +N or -N with N from 1 to 8"),
        (("decode", "many"), "error: scale count 'many' is invalid: must be +N or -N with N from 1 to 8"),
        (("gpu", "+1"), "error: scale role 'gpu' is invalid: must be one of prefill, decode, colocated, adaptive "
                        "(prefill or decode in a PD deployment; colocated, or prefill, when DECODE_INS_NUM=0; adaptive "
                        "with ROLES=adaptive)"),
        (("decode",), f"error: scale: the following arguments are required: delta; {_SCALE_USAGE}"),
        (("decode", "+1", "more"), f"error: scale: unrecognized arguments: more; {_SCALE_USAGE}"),
    ],
)
def test_bad_scale_arguments_are_refused_in_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    result = run_cli("scale", isolated_env(tmp_path), *args, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(expected), result.stderr


def test_scale_without_a_deployment(tmp_path: Path) -> None:
    result = run_cli("scale", isolated_env(tmp_path), "decode", "-1", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no deployment is running in RUN_DIR={tmp_path / 'run'}; deploy first: bash run_vllm_on_yr.sh deploy"
    ]


def test_status_logs_and_clean_of_a_checkout_that_never_deployed_answer_without_setting_up(tmp_path: Path) -> None:
    """A fresh clone: nothing deployed from it, no environment. The three verbs answer at
    once and set nothing up (it took 83 s to install everything, then say nothing ran)."""
    env = {**isolated_env(tmp_path), "VENV_DIR": str(tmp_path / "no-venv")}
    answers = {verb: run_cli(verb, env, timeout=30) for verb in ("status", "logs", "clean")}
    assert (answers["status"].returncode, answers["status"].stdout) == (1, "no deployment is running (deploy with: bash run_vllm_on_yr.sh deploy)\n")
    assert (answers["logs"].returncode, answers["logs"].stdout) == (0, f"no logs: nothing was deployed from {env['RUN_DIR']}\n")
    assert (answers["clean"].returncode, answers["clean"].stdout) == (0, "nothing was running\n")
    assert all(answer.stderr == "" for answer in answers.values())
    assert not (tmp_path / "no-venv").exists()
