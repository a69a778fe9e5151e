"""End to end, request migration: the only decode engine is killed (SIGKILL to its
process group) in the middle of a greedy completions stream. The front door continues
the stream on another engine (here the prefill engine, the only one left) with the
prompt's and the generated tokens' ids; the client reads the same text as an
uninterrupted run, under one completion id, without the token id fields it did not ask
for; requests after it succeed. The decode engine comes back; its EngineCore alone is then
killed mid-stream (the API server sends an error event and [DONE]: a cut, continued the
same way); then the prefill engine is killed, and a request still gets the same text
(the decode computes the prompt). A float32 model, so that recomputing the same tokens'
KV on another engine gives the same greedy choices."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from deploy.state import DeploymentState
from tests.e2e import ENGINE_PARAMS, deployed, metric, token_prompt
from tests.helpers import process_tree

pytestmark = pytest.mark.e2e

LONG_ENGINE_PARAMS = f"{ENGINE_PARAMS} --max-model-len 1024"


def _stream(url: str, body: dict[str, object], on_event: Callable[[int], None] | None = None) -> tuple[list[dict], str]:
    events, text = [], ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            events.append(event)
            text += event["choices"][0]["text"]
            if on_event is not None:
                on_event(len(events))
    return events, text


def _engine_core(server_pid: int) -> int:
    """The EngineCore process under an engine's API server."""
    cores = [pid for pid in process_tree(server_pid) if _comm(pid).startswith("VLLM::EngineCor")]
    assert len(cores) == 1, f"EngineCore processes under {server_pid}: {cores}"
    return cores[0]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_a_stream_whose_decode_engine_dies_goes_on_with_the_same_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Both legs for every request (SELECTIVE_PD_TOKENS=0): the 200-token prompt is handed
    # over, so a wrong block would show in the text before the cut.
    settings = {"PREFILL_STARTUP_PARAMS": LONG_ENGINE_PARAMS, "DECODE_STARTUP_PARAMS": LONG_ENGINE_PARAMS,
                "SELECTIVE_PD_TOKENS": "0"}  # fmt: skip
    with deployed(tmp_path_factory.mktemp("migration"), **settings) as deployment:
        body = {"model": deployment.state.served_model_name, "prompt": token_prompt(200), "max_tokens": 300,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        # The prefill engine computing alone (a cache_salt of its own: nothing reused or
        # loaded): a wrong block handed over would change the door's text, not this one.
        _, reference = _stream(deployment.engine_url("prefill"), {**body, "cache_salt": "alone"})
        decode = next(engine for engine in deployment.state.engines if engine["role"] == "decode")
        killed_at: list[int] = []

        def kill_decode_at_event_20(count: int) -> None:
            if count == 20 and not killed_at:
                os.killpg(int(decode["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
                killed_at.append(count)

        events, text = _stream(deployment.url, body, kill_decode_at_event_20)
        assert killed_at == [20]
        assert text == reference  # the same greedy text, 300 tokens
        assert len({event["id"] for event in events}) == 1  # one completion id throughout
        assert all("token_ids" not in event["choices"][0] for event in events)  # not asked for: removed
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert metric(deployment.url, "frontdoor_stream_migrations_total", outcome="continued") == 1.0
        assert metric(deployment.url, "frontdoor_stream_migrations_total", outcome="failed") == 0.0
        after = httpx.post(f"{deployment.url}/v1/completions", timeout=120,
                           json={**body, "stream": False, "max_tokens": 8})  # fmt: skip
        assert after.status_code == 200, after.text

        # The killed decode engine comes back (restarted by its supervisor) ...
        state_file = Path(deployment.env["RUN_DIR"]) / "state.json"
        deadline = time.monotonic() + 300
        while True:
            engines = {e["role"]: e for e in DeploymentState.read(state_file).engines}  # type: ignore[union-attr]
            if engines["decode"]["state"] == "healthy" and engines["decode"]["pid"] != decode["pid"]:
                break
            assert time.monotonic() < deadline, f"the decode engine did not come back: {engines['decode']}"
            time.sleep(1)
        # Its EngineCore killed mid-stream (the OOM killer's usual target), the API server
        # alive: it sends an error event and [DONE], which the door takes as a cut.
        core = _engine_core(int(engines["decode"]["pid"]))  # type: ignore[arg-type]
        core_killed: list[int] = []

        def kill_core_at_event_20(count: int) -> None:
            if count == 20 and not core_killed:
                os.kill(core, signal.SIGKILL)
                core_killed.append(count)

        events, text = _stream(deployment.url, body, kill_core_at_event_20)
        assert core_killed == [20] and text == reference
        assert len({event["id"] for event in events}) == 1 and events[-1]["choices"][0]["finish_reason"] == "length"
        assert metric(deployment.url, "frontdoor_stream_migrations_total", outcome="continued") == 2.0
        deadline = time.monotonic() + 300
        while True:  # the supervisor replaces the engine whose core died
            engines = {e["role"]: e for e in DeploymentState.read(state_file).engines}  # type: ignore[union-attr]
            if engines["decode"]["state"] == "healthy" and _engine_core(int(engines["decode"]["pid"])) != core:  # type: ignore[arg-type]
                break
            assert time.monotonic() < deadline, f"the decode engine did not come back after its core died: {engines['decode']}"
            time.sleep(1)
        # ... and with the prefill engine killed, requests still succeed: the decode engine
        # computes the prompt itself, with the same greedy text.
        os.killpg(int(engines["prefill"]["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
        whole = httpx.post(f"{deployment.url}/v1/completions", json={**body, "stream": False}, timeout=300)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["text"] == reference
