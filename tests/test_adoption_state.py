"""What state.json says while a restarted deploy process adopts what the killed one left:
the engines and the data system ownership stay recorded until it has them, so that a
second kill meanwhile is restarted too and ``clean`` still stops everything."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

from common.config import ServiceConfig
from deploy.config import build_config
from deploy.keeper import Keeper
from deploy.serve import initial_state
from deploy.state import DeploymentState

ENGINES: list[dict[str, object]] = [{"name": "prefill-0", "pid": 4242, "port": 20001}, {"name": "decode-0", "pid": 4343, "port": 20002}]


def _config(tmp_path: Path) -> ServiceConfig:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "RUN_DIR": str(tmp_path / "run")})
    return dataclasses.replace(config, session_dir=tmp_path / "sessions" / "vllm-1")


def test_an_adopting_process_keeps_the_engines_and_the_workers_recorded(tmp_path: Path) -> None:
    config = _config(tmp_path)
    previous = DeploymentState(pid=1, endpoint="e", yr_mode="local", served_model_name="/models/m",
                               ds_worker_address="127.0.0.1:31501", ds_started_here=True,
                               log_dir=str(tmp_path / "sessions" / "vllm-1" / "log"), engines=ENGINES)  # fmt: skip
    adopting = initial_state(config, previous, "local", ("127.0.0.1:31501",))
    assert (adopting.engines, adopting.ds_started_here, adopting.served_model_name) == (ENGINES, True, "/models/m")
    assert adopting.log_dir == previous.log_dir
    fresh = initial_state(config, None, "local", ("127.0.0.1:31501",))
    assert (fresh.engines, fresh.ds_started_here) == ([], False)


def test_a_second_kill_while_adopting_is_restarted_too(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.run_dir.mkdir(parents=True)
    previous = DeploymentState(pid=1, endpoint="e", yr_mode="local", served_model_name="m", ds_worker_address="a",
                               ds_started_here=True, log_dir="l", engines=ENGINES)  # fmt: skip
    initial_state(config, previous, "local", ("a",)).write(config.state_file)
    keeper = Keeper([], config.state_file, config.pid_file)
    assert keeper._should_restart(-signal.SIGKILL)
    initial_state(config, None, "local", ("a",)).write(config.state_file)
    assert not keeper._should_restart(-signal.SIGKILL)  # killed before it was ever ready: not restarted
