"""The door's admin endpoints and the ``scale`` verb against real HTTP servers: the door
(the FrontDoor serving) with a real Scaler, fake engines (tests/fake_engines.py), and a
fake Controller that starts more fake engines when asked. What is checked: auth, bad
input, 409 while an operation runs, a failed start, the table following scale-out and
scale-in, a drain that waits for requests in flight before removing the engine (the
order of events exactly), metrics, and the CLI's output and exit codes."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import deploy.admin_client as admin_client
from common.errors import StartupError
from common.processes import write_pid
from controller.placement import plan_engines
from controller.scaling import Scaler
from deploy import cli
from deploy.config import build_config
from deploy.state import DeploymentState
from door.builder import build_door
from testkit.helpers import free_port, wait_for
from testkit.metrics import samples
from tests.fake_engines import FakeEngine, serving
from workers.engine_process import EngineSpec

MODEL = Path("/models/m")
WORKERS = ("127.0.0.1:31501",)


class FakeController:
    """The Controller as the door (``snapshot``) and the Scaler see it, over fake engines
    served for real; every call it gets goes to ``events``."""

    def __init__(self, stack: ExitStack, engines: list[FakeEngine], events: list[str], start_delay_s: float = 0.0,
                 fail_start: bool = False) -> None:  # fmt: skip
        self._stack, self._events = stack, events
        self.start_delay_s, self.fail_start = start_delay_s, fail_start
        self.engines = {engine.name: engine for engine in engines}
        self._draining: set[str] = set()
        self._version = 0
        self._lock = threading.Lock()
        for engine in engines:
            stack.enter_context(serving(engine.app(), engine.port))

    def snapshot(self) -> tuple[int, list[dict[str, object]]]:
        with self._lock:
            return self._version, [{**engine.info, "state": "draining" if name in self._draining else "healthy"}
                                   for name, engine in self.engines.items()]  # fmt: skip

    def add_engines(self, specs: list[EngineSpec]) -> list[dict[str, object]]:
        self._events.append(f"add {','.join(spec.name for spec in specs)}")
        time.sleep(self.start_delay_s)
        if self.fail_start:
            raise StartupError(f"an engine failed to start: engine {specs[0].name} exited with code 1 while starting")
        added = [FakeEngine(spec.name, spec.role.value, events=self._events) for spec in specs]
        for engine in added:
            self._stack.enter_context(serving(engine.app(), engine.port))
        with self._lock:
            self.engines.update({engine.name: engine for engine in added})
            self._version += 1
        return [{**engine.info, "pid": 4242, "devices": list(spec.devices)} for engine, spec in zip(added, specs)]

    def set_draining(self, name: str, draining: bool = True) -> None:
        self._events.append(f"draining {name}" if draining else f"serving again {name}")
        with self._lock:
            (self._draining.add if draining else self._draining.discard)(name)
            self._version += 1

    def remove_engine(self, name: str) -> dict[str, object]:
        self._events.append(f"removed {name}")
        with self._lock:
            self.engines.pop(name)
            self._draining.discard(name)
            self._version += 1
        return {"name": name, "pid": 4242}


@dataclass
class Door:
    url: str
    controller: FakeController
    events: list[str]
    headers: dict[str, str]

    def engine(self, name: str) -> FakeEngine:
        return self.controller.engines[name]

    def scale(self, role: str, delta: object) -> httpx.Response:
        return httpx.post(f"{self.url}/admin/scale", json={"role": role, "delta": delta}, headers=self.headers, timeout=60)

    def table(self) -> dict[str, dict[str, Any]]:
        rows = httpx.get(f"{self.url}/admin/engines", headers=self.headers, timeout=10).json()["engines"]
        return {row["name"]: row for row in rows}


@contextmanager
def admin_door(settings: dict[str, str] | None = None, api_key: str | None = None, with_scaler: bool = True,
               engine: Callable[[EngineSpec, list[str]], FakeEngine] | None = None,
               **controller_options: Any) -> Iterator[Door]:  # fmt: skip
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-3", "DRAIN_TIMEOUT_S": "20", **(settings or {})})
    specs = plan_engines(config, MODEL, "m", WORKERS, cores=(0, 1, 2, 3))
    events: list[str] = []
    make = engine or (lambda spec, log: FakeEngine(spec.name, spec.role.value, events=log))
    with ExitStack() as stack:
        controller = FakeController(stack, [make(spec, events) for spec in specs], events, **controller_options)
        version, infos = controller.snapshot()
        scaler = Scaler(controller, config, MODEL, "m", WORKERS, specs, cores=(0, 1, 2, 3)) if with_scaler else None
        door_config = dataclasses.replace(config, routing_policy="round_robin", api_key=api_key)
        door = build_door(door_config, infos, "m", refresh=controller.snapshot, scaler=scaler)
        door.table.version = version
        port = free_port()
        stack.enter_context(serving(door.app, port, door.uvicorn_config("127.0.0.1", port, drain_timeout_s=5)))
        yield Door(f"http://127.0.0.1:{port}", controller, events, {"Authorization": f"Bearer {api_key}"} if api_key else {})



def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    return error


def test_scale_out_adds_an_engine_the_door_routes_to() -> None:
    with admin_door() as door:
        response = door.scale("decode", 1)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["role"] == "decode" and result["delta"] == 1 and result["removed"] == []
        (added,) = result["added"]
        new = door.engine("decode-1")
        assert added == {"name": "decode-1", "url": f"http://127.0.0.1:{new.port}", "pid": 4242, "devices": [2]}
        assert set(result["phases"]) == {"place_s", "start_s", "route_s"}
        table = door.table()
        assert {name: (row["role"], row["state"]) for name, row in table.items()} == {
            "prefill-0": ("prefill", "healthy"), "decode-0": ("decode", "healthy"), "decode-1": ("decode", "healthy")}  # fmt: skip
        for i in range(4):
            assert httpx.post(f"{door.url}/v1/completions", json={"prompt": f"p{i}"}, timeout=10).status_code == 200
        assert len(new.received) == 2  # decode legs alternate between the two idle decode engines
        assert samples(door.url, "frontdoor_scale_operations_total", direction="out", outcome="done", role="decode") == [1]
        assert samples(door.url, "frontdoor_engines", role="decode") == [2]
    assert door.events == ["add decode-1", "prefill-0 finished", "decode-0 finished", "prefill-0 finished",
                           "decode-1 finished", "prefill-0 finished", "decode-0 finished", "prefill-0 finished",
                           "decode-1 finished"]  # fmt: skip


def test_a_colocated_deployment_scales_colocated_and_accepts_prefill_for_it() -> None:
    with admin_door({"DECODE_INS_NUM": "0"}) as door:
        assert door.scale("prefill", 1).json()["added"][0]["name"] == "colocated-1"
        assert door.scale("colocated", -1).json()["removed"][0]["name"] == "colocated-1"
        refused = door.scale("decode", 1)
        assert refused.status_code == 400
        assert _error(refused)["message"].startswith("role 'decode' is invalid: this PD-colocated deployment")
    assert [e for e in door.events if "finished" not in e] == ["add colocated-1", "draining colocated-1", "removed colocated-1"]


def test_scale_in_drains_requests_in_flight_before_removing_the_engine() -> None:
    def slow_stream(spec: EngineSpec, log: list[str]) -> FakeEngine:
        return FakeEngine(spec.name, spec.role.value, events=log, stream_chunks=10, chunk_delay_s=0.15)

    answers: dict[str, tuple[int, int]] = {}

    def stream(door: Door, tag: str) -> None:
        body = {"prompt": tag, "stream": True, "max_tokens": 10}
        with httpx.stream("POST", f"{door.url}/v1/completions", json=body, timeout=30) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        answers[tag] = (response.status_code, len(events))

    with admin_door({"DECODE_INS_NUM": "2"}, engine=slow_stream) as door:
        decode_0, decode_1 = door.engine("decode-0"), door.engine("decode-1")
        clients = [threading.Thread(target=stream, args=(door, tag)) for tag in ("a", "b")]
        for client in clients:
            client.start()
            time.sleep(0.1)
        wait_for(lambda: len(decode_0.received) == 1 and len(decode_1.received) == 1, 10, "one stream on each decode")
        scaled: dict[str, httpx.Response] = {}
        scaler = threading.Thread(target=lambda: scaled.setdefault("answer", door.scale("decode", -1)))
        scaler.start()
        wait_for(lambda: door.table()["decode-1"]["state"] == "draining", 10, "the door showing decode-1 draining")
        assert door.table()["decode-1"]["in_flight"] == 1  # its stream goes on
        # A request arriving during the drain goes to decode-0 only.
        assert httpx.post(f"{door.url}/v1/completions", json={"prompt": "c"}, timeout=10).status_code == 200
        assert (len(decode_0.received), len(decode_1.received)) == (2, 1)
        scaler.join(30)
        for client in clients:
            client.join(30)
        answer = scaled["answer"]
        assert answer.status_code == 200, answer.text
        assert answer.json()["removed"] == [{"name": "decode-1", "pid": 4242, "in_flight_at_stop": 0}]
        assert answer.json()["warnings"] == []
        assert answers == {"a": (200, 11), "b": (200, 11)}  # 10 chunks and [DONE] each: nothing cut
        assert set(door.table()) == {"prefill-0", "decode-0"}
        assert samples(door.url, "frontdoor_engines", role="decode") == [1]
        assert samples(door.url, "frontdoor_engine_healthy", engine="decode-1", role="decode") == []
    assert [e for e in door.events if "decode-1" in e] == ["draining decode-1", "decode-1 finished", "removed decode-1"]


def test_a_second_operation_while_one_runs_gets_409() -> None:
    with admin_door(start_delay_s=1.5) as door:
        first: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: first.setdefault("answer", door.scale("decode", 1)))
        thread.start()
        wait_for(lambda: httpx.get(f"{door.url}/admin/scale", timeout=5).json().get("phase") == "starting decode-1",
                  5, "the first operation starting its engine")  # fmt: skip
        progress = httpx.get(f"{door.url}/admin/scale", timeout=5).json()
        assert progress["busy"] is True and progress["operation"] == "decode +1" and progress["elapsed_s"] >= 0
        second = door.scale("prefill", 1)
        thread.join(20)
        assert second.status_code == 409
        assert _error(second) == {"message": "another scale operation is under way (decode +1: starting decode-1); retry "
                                             "when it has ended", "type": "conflict", "param": None, "code": 409}  # fmt: skip
        assert first["answer"].status_code == 200
        assert httpx.get(f"{door.url}/admin/scale", timeout=5).json() == {"busy": False}
    assert [e for e in door.events if e.startswith("add")] == ["add decode-1"]


def test_a_failed_start_answers_500_and_changes_nothing() -> None:
    with admin_door(fail_start=True) as door:
        response = door.scale("decode", 1)
        assert response.status_code == 500
        assert _error(response)["message"] == ("scale decode +1 failed: an engine failed to start: engine decode-1 "
                                               "exited with code 1 while starting")  # fmt: skip
        assert set(door.table()) == {"prefill-0", "decode-0"}
        door.controller.fail_start = False
        assert door.scale("decode", 1).json()["added"][0]["name"] == "decode-1"  # the name was not taken
        assert samples(door.url, "frontdoor_scale_operations_total", direction="out", outcome="failed", role="decode") == [1]


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (b"{not json", 400, None, "request body is not valid JSON"),
        (b"[1]", 400, None, "request body must be a JSON object"),
        ({"role": "gpu", "delta": 1}, 400, "role", "'role' 'gpu' is invalid: must be one of prefill, decode, colocated, adaptive"),
        ({"role": "decode", "delta": 0}, 400, "delta", "'delta' 0 is invalid: must be a non-zero integer from -8 to 8"),
        ({"role": "decode", "delta": "1"}, 400, "delta", "'delta' '1' is invalid"),
        ({"role": "decode", "delta": True}, 400, "delta", "'delta' True is invalid"),
        ({"role": "decode", "delta": 9}, 400, "delta", "'delta' 9 is invalid"),
        ({"role": "colocated", "delta": 1}, 400, None, "role 'colocated' is invalid: this PD-disaggregated deployment "
                                                       "scales prefill or decode"),
        ({"role": "decode", "delta": -1}, 400, None, "scale decode -1 is invalid: 1 decode instance(s) run (decode-0) "
                                                     "and at least one must stay; remove at most 0"),
    ],
)
def test_bad_requests_are_refused_in_openai_form_and_change_nothing(body: object, status: int, param: str | None,
                                                                    message: str) -> None:  # fmt: skip
    with admin_door() as door:
        if isinstance(body, bytes):
            response = httpx.post(f"{door.url}/admin/scale", content=body, timeout=10)
        else:
            response = httpx.post(f"{door.url}/admin/scale", json=body, timeout=10)
        assert response.status_code == status
        error = _error(response)
        assert error["message"].startswith(message) and error["param"] == param
        assert set(door.table()) == {"prefill-0", "decode-0"}
    assert door.events == []


def test_the_admin_endpoints_need_the_api_key_when_one_is_set() -> None:
    with admin_door(api_key="sekret") as door:
        for method, path in (("POST", "/admin/scale"), ("GET", "/admin/scale"), ("GET", "/admin/engines")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = httpx.request(method, f"{door.url}{path}", json={"role": "decode", "delta": 1},
                                         headers=headers, timeout=10)  # fmt: skip
                assert response.status_code == 401, (method, path)
                assert _error(response)["type"] == "invalid_request_error"
        assert door.events == []
        assert door.scale("decode", 1).status_code == 200  # with the key
        assert "decode-1" in door.table()


def test_a_door_without_a_scaler_answers_501() -> None:
    with admin_door(with_scaler=False) as door:
        response = door.scale("decode", 1)
        assert response.status_code == 501 and _error(response)["type"] == "not_implemented"
        assert httpx.get(f"{door.url}/admin/scale", timeout=5).status_code == 501
        assert set(door.table()) == {"prefill-0", "decode-0"}  # the table is listed all the same


# --- the `scale` verb against this door ---------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point the CLI at a 'deployment' whose door is ``url`` (this process stands for the
    deploy process: its pid is the recorded one)."""
    for name in ("MODEL_PATH", "YR_SERVER_ADDRESS", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("YR_SESSIONS_DIR", str(tmp_path / "yr"))
    monkeypatch.setenv("ACCELERATOR", "cpu")
    monkeypatch.setattr(admin_client, "PROGRESS_POLL_S", 0.2)

    def point_at(url: str) -> None:
        (tmp_path / "run").mkdir(exist_ok=True)
        DeploymentState(pid=os.getpid(), endpoint=url, yr_mode="local", served_model_name="m", ds_worker_address="",
                        ds_started_here=False, log_dir=str(tmp_path)).write(tmp_path / "run" / "state.json")  # fmt: skip
        write_pid(tmp_path / "run" / "deploy.pid", os.getpid())

    return point_at


def test_the_scale_verb_prints_progress_and_the_engines(cli_env: Callable[[str], None], capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with admin_door(api_key="sekret", start_delay_s=0.8) as door:
        cli_env(door.url)
        monkeypatch.setenv("API_KEY", "sekret")
        assert cli.main(["scale", "decode", "+1"]) == 0
        out = capsys.readouterr().out.splitlines()
        port = door.engine("decode-1").port
        assert out[0] == f"scaling decode +1 through {door.url} (the door keeps serving meanwhile) ..."
        assert any(line.endswith("s  starting decode-1") for line in out[1:-2]), out
        assert out[-2] == f"added decode-1: http://127.0.0.1:{port}, pid 4242, devices 2"
        assert out[-1].startswith("serving ") and " s after the request (engine start " in out[-1]

        assert cli.main(["scale", "decode", "-1"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-2] == "removed decode-1 (pid 4242; 0 request(s) in flight when it stopped)"
        assert out[-1].startswith("done ") and "(drain " in out[-1]

        assert cli.main(["scale", "decode", "-1"]) == 2  # the last decode
        captured = capsys.readouterr()
        assert captured.err.splitlines() == ["error: scale decode -1 is invalid: 1 decode instance(s) run (decode-0) "
                                             "and at least one must stay; remove at most 0"]  # fmt: skip

        monkeypatch.setenv("API_KEY", "wrong")
        assert cli.main(["scale", "decode", "+1"]) == 2
        assert capsys.readouterr().err.startswith(f"error: API_KEY is invalid for the door at {door.url}: ")
    assert [e for e in door.events if "finished" not in e] == ["add decode-1", "draining decode-1", "removed decode-1"]


def test_the_scale_verb_without_a_deployment_or_with_a_silent_door(cli_env: Callable[[str], None],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert cli.main(["scale", "decode", "+1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no deployment is running in RUN_DIR=")
    silent = f"http://127.0.0.1:{free_port()}"
    cli_env(silent)
    assert cli.main(["scale", "decode", "+1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the front door at {silent}/admin/scale does not answer")


def test_json_of_a_scale_result_is_what_the_cli_reads() -> None:
    reply = json.loads(json.dumps({"role": "decode", "delta": 1, "added": [{"name": "decode-1", "url": "http://h:1",
                                   "pid": 5, "devices": []}], "removed": [], "seconds": 41.25,
                                   "phases": {"place_s": 0.01, "start_s": 40.9, "route_s": 0.34}, "warnings": ["w"]}))  # fmt: skip
    assert admin_client.result_lines(reply, 41.5) == [
        "warning: w", "added decode-1: http://h:1, pid 5, devices -",
        "serving 41.2 s after the request (engine start 40.9 s, routing 0.3 s); 41.5 s from the command",
    ]  # fmt: skip
