"""End to end, request migration: the only decode engine is killed (SIGKILL to its
process group) in the middle of a greedy completions stream. The front door continues
the stream on another engine (here the prefill engine, the only one left) with the
prompt's and the generated tokens' ids; the client reads the same text as an
uninterrupted run, under one completion id, without the token id fields it did not ask
for, and without losing the text vLLM would hold back for a stop string; requests after
it succeed. The decode engine comes back; its EngineCore alone is then killed in the
middle of a chat stream and a completions stream (the API server sends an error event
and [DONE]: a cut, continued the same way, the chat's as chat chunks), then while it
computes a non-streamed chat and a non-streamed completions request (a prefill engine
serves each whole); then the prefill engine is killed, and a request still gets the same
text (the decode computes the prompt). A float32 model, so
that recomputing the same tokens' KV on another engine gives the same greedy choices."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from deploy.state import DeploymentState
from testkit.deployment import ENGINE_PARAMS, deployed, token_prompt
from testkit.helpers import process_tree
from testkit.metrics import metric

pytestmark = pytest.mark.e2e

LONG_ENGINE_PARAMS = f"{ENGINE_PARAMS} --max-model-len 1024"


# A stop string the model never writes: vLLM holds back its length less one character
# of every stream's text, which a cut would lose with the engine.
NEVER = "@@never-stop@@"


def _stream(url: str, body: dict[str, object], on_event: Callable[[int], None] | None = None,
            endpoint: str = "completions") -> tuple[list[dict], str]:  # fmt: skip
    events, text = [], ""
    with httpx.stream("POST", f"{url}/v1/{endpoint}", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append({"done": True})
                continue
            event = json.loads(line[6:])  # every event valid JSON
            events.append(event)
            if event.get("choices"):
                choice = event["choices"][0]
                text += choice["text"] if endpoint == "completions" else (choice["delta"].get("content") or "")
            if on_event is not None:
                on_event(len(events))
    assert events and events[-1] == {"done": True}, events[-3:]
    return events[:-1], text


def _back(state_file: Path, role: str, replaced: Callable[[dict], bool]) -> dict:
    """The engines once ``role``'s is healthy again and ``replaced`` says it is a new one."""
    deadline = time.monotonic() + 300
    while True:
        engines = {e["role"]: e for e in DeploymentState.read(state_file).engines}  # type: ignore[union-attr]
        if engines[role]["state"] == "healthy" and replaced(engines[role]):
            return engines
        assert time.monotonic() < deadline, f"the {role} engine did not come back: {engines[role]}"
        time.sleep(1)


def _engine_core(server_pid: int) -> int:
    """The EngineCore process under an engine's API server."""
    cores = _cores(server_pid)
    assert len(cores) == 1, f"EngineCore processes under {server_pid}: {cores}"
    return cores[0]


def _cores(server_pid: int) -> list[int]:
    return [pid for pid in process_tree(server_pid) if _comm(pid).startswith("VLLM::EngineCor")]


def _core_replaced(core: int) -> Callable[[dict], bool]:
    """Whether an engine (a state.json entry) runs one EngineCore, not ``core``."""
    return lambda engine: len(cores := _cores(int(engine["pid"]))) == 1 and cores != [core]


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
        model = deployment.state.served_model_name
        body = {"model": model, "prompt": token_prompt(200), "max_tokens": 300, "temperature": 0, "ignore_eos": True,
                "stream": True, "stop": [NEVER]}  # fmt: skip
        # The prefill engine computing alone (a cache_salt of its own: nothing reused or
        # loaded): a wrong block handed over would change the door's text, not this one.
        alone = deployment.engine_url("prefill")
        _, reference = _stream(alone, {**body, "cache_salt": "alone"})
        assert NEVER not in reference and len(reference) > 300

        # A stop string that is met: the door cuts it as vLLM does (the door checks stop
        # strings itself; the engine is asked to hold nothing back).
        met = {**body, "stop": [NEVER, reference[120:126]]}
        engine_events, engine_text = _stream(alone, {**met, "cache_salt": "alone"})
        door_events, door_text = _stream(deployment.url, met)
        assert door_text == engine_text == reference[: reference.index(reference[120:126])]
        for field in ("finish_reason", "stop_reason"):
            assert door_events[-1]["choices"][0][field] == engine_events[-1]["choices"][0][field]
        assert door_events[-1]["choices"][0]["finish_reason"] == "stop"

        decode = next(engine for engine in deployment.state.engines if engine["role"] == "decode")
        killed_at: list[int] = []

        def kill_decode_at_event_20(count: int) -> None:
            if count == 20 and not killed_at:
                os.killpg(int(decode["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
                killed_at.append(count)

        events, text = _stream(deployment.url, body, kill_decode_at_event_20)
        assert killed_at == [20]
        assert text == reference  # the same greedy text, 300 tokens, the held-back characters too
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
        engines = _back(state_file, "decode", lambda engine: engine["pid"] != decode["pid"])
        # Its EngineCore killed in the middle of a chat stream (the OOM killer's usual
        # target), the API server alive: it sends an error event and [DONE], which the door
        # takes as a cut; the chat goes on as a completion of its token ids, relayed as chat chunks.
        chat = {"model": model, "messages": [{"role": "user", "content": "tell me about the weather " * 12}],
                "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True, "stop": NEVER}  # fmt: skip
        _, chat_reference = _stream(alone, {**chat, "cache_salt": "alone"}, endpoint="chat/completions")
        assert len(chat_reference) > 300
        core = _engine_core(int(engines["decode"]["pid"]))  # type: ignore[arg-type]
        core_killed: list[int] = []

        def kill_core_at_event_20(count: int) -> None:
            if count == 20 and not core_killed:
                os.kill(core, signal.SIGKILL)
                core_killed.append(count)

        # A completions stream beside it, under way on the same decode when the core dies.
        beside: list[tuple[list[dict], str]] = []
        streaming = threading.Event()
        completions = threading.Thread(target=lambda: beside.append(
            _stream(deployment.url, body, lambda count: count == 5 and streaming.set())))  # fmt: skip
        completions.start()
        assert streaming.wait(120), "the completions stream never started"
        events, text = _stream(deployment.url, chat, kill_core_at_event_20, endpoint="chat/completions")
        completions.join(300)
        assert core_killed == [20] and text == chat_reference
        assert len({event["id"] for event in events}) == 1 and {event["object"] for event in events} == {"chat.completion.chunk"}
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert all("token_ids" not in event["choices"][0] and "prompt_token_ids" not in event for event in events)
        assert beside, "the completions stream beside the chat failed"
        beside_events, beside_text = beside[0]
        assert beside_text == reference and len({event["id"] for event in beside_events}) == 1
        assert metric(deployment.url, "frontdoor_stream_migrations_total", outcome="continued") == 3.0

        # Not streamed: the EngineCore killed while the decode engine computes a chat and a
        # completions answer; nothing reached the clients, so a prefill engine serves each whole.
        engines = _back(state_file, "decode", _core_replaced(core))
        core = _engine_core(int(engines["decode"]["pid"]))  # type: ignore[arg-type]
        decode_url = f"http://{engines['decode']['host']}:{engines['decode']['port']}"
        answers: dict[str, httpx.Response] = {}
        requests = [threading.Thread(target=lambda endpoint=endpoint, request=request: answers.__setitem__(
            endpoint, httpx.post(f"{deployment.url}/v1/{endpoint}", json={**request, "stream": False}, timeout=300)))
            for endpoint, request in (("chat/completions", chat), ("completions", body))]  # fmt: skip
        for request in requests:
            request.start()
        deadline = time.monotonic() + 120
        while metric(decode_url, "vllm:num_requests_running") < 2:  # both decode legs are being computed
            assert time.monotonic() < deadline and all(r.is_alive() for r in requests), "the decode never ran both"
            time.sleep(0.02)
        os.kill(core, signal.SIGKILL)
        for request in requests:
            request.join(300)
        assert {endpoint: answer.status_code for endpoint, answer in answers.items()} == {"chat/completions": 200, "completions": 200}
        assert answers["chat/completions"].json()["choices"][0]["message"]["content"] == chat_reference
        assert answers["completions"].json()["choices"][0]["text"] == reference

        # ... and with the prefill engine killed, requests still succeed: the decode engine
        # computes the prompt itself, with the same greedy text.
        engines = _back(state_file, "decode", _core_replaced(core))
        os.killpg(int(engines["prefill"]["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
        whole = httpx.post(f"{deployment.url}/v1/completions", json={**body, "stream": False}, timeout=300)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["text"] == reference
