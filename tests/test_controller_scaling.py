"""The Controller's runtime scaling methods on real actors: openYuanrong's local mode, real
engine actors supervising stand-in engine processes (tests/stand_in_engine.py, an HTTP
server answering /health with a child that outlives it, as vLLM's EngineCore does).

Checked: ``snapshot`` answers while ``add_engines`` waits for an engine to start (the
actor's concurrency), new engines join the list only once healthy, a name in use is
refused, a failed start stops the new engine and leaves the others, ``set_draining``
shows in the snapshot, ``remove_engine`` stops the engine's process group and drops it,
and nothing is left running."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yr

import workers.engine_actor as engine_actor
from common.processes import pid_alive
from controller.controller import CONTROLLER_CONCURRENCY, Controller
from controller.placement import plan_engines
from deploy.config import build_config
from deploy.runtime import finalize_yr
from testkit.helpers import pids_matching, wait_for
from workers.engine_process import EngineSpec

SLOW_START_S = 3.0  # the engine scaled out waits this long before it listens


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[EngineSpec], str]]:
    marker = f"stand-in-{uuid.uuid4().hex}"

    def argv(spec: EngineSpec, port: int, events_port: int = 0) -> list[str]:
        if spec.name == "decode-9":  # an engine that cannot start
            return [sys.executable, "-c", "raise SystemExit(3)", marker]
        stand_in = [sys.executable, "-m", "tests.stand_in_engine", "--port", str(port), "--marker", marker]
        if spec.name == "decode-1":  # started at runtime: slow, as a real engine is
            return ["bash", "-c", f'sleep {SLOW_START_S} && exec "$0" "$@"  # slow start of {marker}', *stand_in]
        return stand_in

    monkeypatch.setattr(engine_actor, "build_engine_argv", argv)
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-3", "RUN_DIR": str(tmp_path / "run"),
                           "YR_SESSIONS_DIR": str(tmp_path / "yr"), "ENGINE_START_TIMEOUT": "30"})  # fmt: skip
    specs = plan_engines(config, Path("/unused"), "m", ("127.0.0.1:31501",), cores=(0, 1, 2, 3))
    yr.init(yr.Config(local_mode=True, server_address="127.0.0.1:1", ds_address="127.0.0.1:1"))
    options = yr.InvokeOptions()
    options.concurrency = CONTROLLER_CONCURRENCY
    handle = yr.instance(Controller).options(options).invoke(config, specs[:2])
    try:
        yr.get(handle.initialize.invoke(), timeout=60)
        yield handle, specs, marker
    finally:
        yr.get(handle.shutdown.invoke(), timeout=120)
        handle.terminate()
        finalize_yr()
        for pid in pids_matching(marker):  # whatever a failing test left behind
            os.kill(pid, signal.SIGKILL)


def _more(specs: list[EngineSpec], name: str, devices: tuple[int, ...]) -> EngineSpec:
    from dataclasses import replace

    return replace(specs[1], name=name, instance=name, devices=devices)


def test_add_drain_and_remove_engines_while_snapshots_go_on(controller: tuple[Any, list[EngineSpec], str]) -> None:
    handle, specs, marker = controller
    version, engines = yr.get(handle.snapshot.invoke(), timeout=30)
    assert [(e["name"], e["state"]) for e in engines] == [("prefill-0", "healthy"), ("decode-0", "healthy")]

    adding = handle.add_engines.invoke([_more(specs, "decode-1", (2,))])
    wait_for(lambda: pids_matching(f"slow start of {marker}"), 10, "decode-1's process starting")
    asked = time.monotonic()
    during_version, during = yr.get(handle.snapshot.invoke(), timeout=30)
    assert time.monotonic() - asked < SLOW_START_S / 2  # answered while the new engine starts
    assert during_version == version and [e["name"] for e in during] == ["prefill-0", "decode-0"]  # not yet listed

    (added,) = yr.get(adding, timeout=60)
    assert added["name"] == "decode-1" and added["state"] == "healthy" and added["devices"] == (2,)
    after_version, after = yr.get(handle.snapshot.invoke(), timeout=30)
    assert after_version > version and [e["name"] for e in after] == ["prefill-0", "decode-0", "decode-1"]
    assert len({e["port"] for e in after}) == 3

    with pytest.raises(Exception, match="engine name\\(s\\) decode-1 are in use already"):
        yr.get(handle.add_engines.invoke([_more(specs, "decode-1", (3,))]), timeout=30)

    with pytest.raises(Exception, match="engine decode-9 exited with code 3 while starting"):
        yr.get(handle.add_engines.invoke([_more(specs, "decode-9", (3,))]), timeout=60)
    failed_version, unchanged = yr.get(handle.snapshot.invoke(), timeout=30)
    assert failed_version == after_version and [e["name"] for e in unchanged] == ["prefill-0", "decode-0", "decode-1"]

    yr.get(handle.set_draining.invoke("decode-1"), timeout=30)
    draining_version, draining = yr.get(handle.snapshot.invoke(), timeout=30)
    assert draining_version > after_version
    assert [(e["name"], e["state"]) for e in draining] == [("prefill-0", "healthy"), ("decode-0", "healthy"),
                                                            ("decode-1", "draining")]  # fmt: skip

    removed = yr.get(handle.remove_engine.invoke("decode-1"), timeout=120)
    assert removed["name"] == "decode-1"
    assert not pid_alive(int(removed["pid"]))  # type: ignore[call-overload]
    assert not Path(str(removed["log"])).with_suffix(".pid").exists()  # clean has nothing left to stop
    removed_version, remaining = yr.get(handle.snapshot.invoke(), timeout=30)
    assert removed_version > draining_version and [e["name"] for e in remaining] == ["prefill-0", "decode-0"]
    assert len(pids_matching(f"engine-core-of-{marker}")) == 2  # the two engines left, and only theirs

    with pytest.raises(Exception, match="engine decode-1 is not running; running: prefill-0, decode-0"):
        yr.get(handle.set_draining.invoke("decode-1"), timeout=30)
