"""End to end: the deploy process (front door + Controller) is killed with SIGKILL while
requests run. The keeper restarts it within seconds; the new process adopts the engines
and the data system worker the killed one left running (same pids: no model reload, KV
kept) and opens the door on the same port; requests after the recovery succeed, PD
handoffs included; ``status`` shows the adopted engines; ``clean`` then stops everything,
the keeper included."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from common.processes import pid_alive, read_pid
from deploy.datasystem import worker_answers
from deploy.state import DeploymentState
from testkit.deployment import complete, deployed, external_kv_tokens, token_prompt
from testkit.helpers import pids_matching, run_cli, wait_for

pytestmark = pytest.mark.e2e


def _send_until(url: str, body: dict[str, object], stop: threading.Event, outcomes: list[int]) -> None:
    while not stop.is_set():
        try:
            outcomes.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)
        except httpx.HTTPError:
            outcomes.append(0)  # the door went away mid-request
            time.sleep(0.2)


def test_a_killed_deploy_process_is_restarted_and_adopts_the_running_engines(tmp_path: Path) -> None:
    with deployed(tmp_path) as deployment:
        run_dir = Path(deployment.env["RUN_DIR"])
        keeper = read_pid(run_dir / "deploy.pid")
        before = DeploymentState.read(run_dir / "state.json")
        assert keeper is not None and before is not None and before.pid != keeper  # the keeper runs the deploy process
        engine_pids = {str(e["name"]): e["pid"] for e in before.engines}
        body = {"model": deployment.state.served_model_name, "prompt": token_prompt(300), "max_tokens": 4, "temperature": 0}
        stop, outcomes = threading.Event(), []
        load = threading.Thread(target=_send_until, args=(deployment.url, body, stop, outcomes))
        load.start()
        try:
            wait_for(lambda: len(outcomes) >= 2, 60, "requests answered before the kill")
            os.kill(before.pid, signal.SIGKILL)  # the front door and the Controller
            killed_at = time.monotonic()
            deadline = killed_at + 180
            after = None
            while time.monotonic() < deadline:
                after = DeploymentState.read(run_dir / "state.json")
                if after is not None and after.pid != before.pid and after.engines and _door_up(deployment.url):
                    break
                time.sleep(0.5)
            recovered_s = time.monotonic() - killed_at
        finally:
            stop.set()
            load.join(120)
        assert after is not None and after.pid != before.pid and pid_alive(after.pid), "no new deploy process"
        print(f"door back {recovered_s:.1f} s after the kill; outcomes during the load: {sorted(set(outcomes))}")
        assert {str(e["name"]): e["pid"] for e in after.engines} == engine_pids  # adopted, not restarted
        assert all(e["state"] == "healthy" for e in after.engines)
        assert after.ds_started_here and worker_answers(after.ds_worker_address)
        assert read_pid(run_dir / "deploy.pid") == keeper
        decode = deployment.engine_url("decode")
        loaded_before = external_kv_tokens(decode)
        assert complete(deployment.url, {**body, "prompt": token_prompt(301)})["choices"]  # type: ignore[index]
        assert external_kv_tokens(decode) - loaded_before == 300  # a PD handoff through the adopted engines: all but the last token
        status = run_cli("status", deployment.env, timeout=60)
        assert status.returncode == 0 and all(str(pid) in status.stdout for pid in engine_pids.values()), status.stdout
        assert f"front door {after.endpoint}  pid {after.pid}  healthy" in status.stdout
        assert f"keeper pid {keeper} (deploy.pid: restarts the front door's process, pid {after.pid}, if it is killed)" in status.stdout
    assert not any(pid_alive(int(pid)) for pid in engine_pids.values())  # type: ignore[arg-type]
    assert keeper is not None and not pid_alive(keeper)
    assert pids_matching(str(tmp_path)) == []


def _door_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
