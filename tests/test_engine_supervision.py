"""The engine actor's supervision against a stand-in engine process (a real HTTP server
with a child that outlives it, as vLLM's EngineCore does): an engine that dies takes its
children with it before it is restarted, and a stop during the restart back-off leaves
nothing running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import workers.engine_actor as engine_actor
from common.config import Accelerator, Role
from testkit.helpers import pids_matching, wait_for
from workers.engine_actor import EngineActor
from workers.engine_process import AdoptedProcess, EngineSpec, stop_process_group


def _stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kv_events: bool = False) -> tuple[EngineSpec, str]:
    """An engine spec whose process is the stand-in engine, and the marker in its argv."""
    marker = f"stand-in-{uuid.uuid4().hex}"
    monkeypatch.setattr(
        engine_actor,
        "build_engine_argv",
        lambda spec, port, events_port=0: [sys.executable, "-m", "tests.stand_in_engine", "--port", str(port), "--marker", marker],
    )
    spec = EngineSpec(
        name="decode-0-dp0", instance="decode-0", role=Role.DECODE, accelerator=Accelerator.CPU, tensor_parallel=1,
        devices=(0,), model_path="unused", served_model_name="unused", startup_params=(), ds_worker_address="",
        prefix_reuse=False, project_root=str(Path(__file__).resolve().parents[1]), cache_root=str(tmp_path),
        cpu_kvcache_gb=1, kv_events=kv_events,
    )  # fmt: skip
    return spec, marker


@pytest.fixture
def actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EngineActor, str]]:
    spec, marker = _stand_in(tmp_path, monkeypatch)
    supervised = EngineActor(spec, str(tmp_path), start_timeout_s=30, advertise_host="127.0.0.1")
    try:
        yield supervised, marker
    finally:
        supervised.stop()
        for pid in pids_matching(marker):  # whatever a failing test left behind
            os.kill(pid, signal.SIGKILL)


def test_a_killed_engine_takes_its_children_with_it_before_the_restart(actor: tuple[EngineActor, str]) -> None:
    supervised, marker = actor
    first = supervised.start()
    assert first["state"] == "healthy"
    children = [pid for pid in pids_matching(f"engine-core-of-{marker}")]
    assert len(children) == 1

    os.kill(int(first["pid"]), signal.SIGKILL)  # the API server dies; its EngineCore stand-in lives on
    wait_for(lambda: supervised.info()["state"] == "healthy" and supervised.info()["pid"] != first["pid"], 20, "restart")

    assert supervised.info()["restarts"] == 1
    assert not Path(f"/proc/{children[0]}").exists()  # the old child was stopped, not orphaned
    assert len(pids_matching(f"engine-core-of-{marker}")) == 1  # only the new engine's


def test_a_stop_during_the_restart_back_off_starts_nothing(actor: tuple[EngineActor, str]) -> None:
    supervised, marker = actor
    first = supervised.start()
    os.kill(int(first["pid"]), signal.SIGKILL)
    wait_for(lambda: supervised.info()["state"] == "restarting", 10, "the supervisor noticing the exit")

    supervised.stop()  # inside the 2 s back-off
    time.sleep(3.0)  # past the back-off: a relaunch would have happened by now

    assert pids_matching(marker) == []
    assert supervised.info()["state"] == "stopped"


def test_an_adopted_engine_keeps_its_kv_events_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy process restarted by the keeper takes over a running engine: its KV events
    port, where the door's index follows it, is the one it was started with (not 0)."""
    spec, marker = _stand_in(tmp_path, monkeypatch, kv_events=True)
    first = EngineActor(spec, str(tmp_path), start_timeout_s=30, advertise_host="127.0.0.1")
    try:
        started = first.start()
        assert started["events_port"] != 0
        first._stopping.set()  # the killed deploy process's actor: gone without stopping its engine
        adopter = EngineActor(spec, str(tmp_path), start_timeout_s=30, advertise_host="127.0.0.1",
                              adopt_port=int(started["port"]), adopt_events_port=int(started["events_port"]))  # type: ignore[call-overload]  # fmt: skip
        adopted = adopter.start()
        assert (adopted["pid"], adopted["port"], adopted["events_port"]) == (started["pid"], started["port"], started["events_port"])
        adopter.stop()
    finally:
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)


def test_an_adopted_engine_is_known_by_pid_and_start_time() -> None:
    """An adopted engine that exited and whose pid a new process got: not signalled (the
    supervisor used to stop whatever process group bore the pid)."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        reused = AdoptedProcess(bystander.pid)
        assert reused.started is not None
        reused.started -= 1  # as if the engine adopted had started earlier: the pid now names another process
        assert reused.pid_reused and reused.poll() == -1
        stop_process_group(reused, grace_s=1)
        assert bystander.poll() is None  # left alone
        engine = AdoptedProcess(bystander.pid)  # the very process: stopped with its group
        assert not engine.pid_reused and engine.poll() is None
        stop_process_group(engine, grace_s=5)
        assert bystander.wait(timeout=5) == -signal.SIGTERM
    finally:
        bystander.kill()
        bystander.wait()


def test_an_engine_whose_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    """A simulated engine (a real process) whose chosen port another process binds first:
    the actor starts it again on another port (seen: 256 engines starting side by side on
    8 addresses were given the same port twice)."""
    model = Path(__file__).resolve().parents[1] / ".cache" / "models"
    from deploy.embedded_model import MODEL_CONFIG, MODEL_NAME, ensure_embedded_model

    spec = EngineSpec(
        name="colocated-0", instance="colocated-0", role=Role.COLOCATED, accelerator=Accelerator.CPU, tensor_parallel=1,
        devices=(0,), model_path=str(ensure_embedded_model(model, MODEL_NAME, MODEL_CONFIG)), served_model_name="m",
        startup_params=("--max-model-len", "512"), ds_worker_address="", prefix_reuse=False,
        project_root=str(Path(__file__).resolve().parents[1]), cache_root=str(tmp_path), cpu_kvcache_gb=1,
        connector="none", sim_profile="cpu-93m-float32",
    )  # fmt: skip
    supervised = EngineActor(spec, str(tmp_path), start_timeout_s=60, advertise_host="127.0.0.1")
    taken = supervised.info()["port"]
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(taken)))  # type: ignore[call-overload]
    blocker.listen()
    try:
        info = supervised.start()
        assert info["state"] == "healthy"
        assert info["port"] != taken
        assert "address already in use" in (tmp_path / "colocated-0.log").read_text()
    finally:
        blocker.close()
        supervised.stop()
