"""End to end, short variant of the system at scale: 16 simulated engines (8 prefill, 8
decode, ENGINE_KIND=simulated) on 4 simulated nodes, everything else real (the
Controller and engine actors on openYuanrong, a data system worker per node, the door
following every engine's KV events, status, clean).

One deployment shared by the tests (each passes alone too); the last one cleans. The
long runs: docs/simulated-engines.md (``bench sim-*``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from common.config import simulated_node_address
from common.processes import pid_alive
from testkit.deployment import Deployment, deployed, token_prompt
from testkit.helpers import pids_matching, run_cli
from testkit.metrics import metric

pytestmark = pytest.mark.e2e

PREFILL, DECODE, NODES = 8, 8, 4
BLOCK = 128  # the CPU profile's block size
SIM_SETTINGS = {
    "ENGINE_KIND": "simulated",
    "PREFILL_INS_NUM": str(PREFILL),
    "DECODE_INS_NUM": str(DECODE),
    "SIMULATED_NODES": str(NODES),
    "PREFILL_STARTUP_PARAMS": "--max-model-len 4096",
    "DECODE_STARTUP_PARAMS": "--max-model-len 4096",
    "DS_SHARED_MEMORY_MB": "64",  # simulated engines keep no KV in the store
    "DS_SHARED_MEMORY_POPULATE": "0",
    "WARM_UP_TOKENS": "128",
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("sim-engines"), **SIM_SETTINGS) as running:
        yield running


def _engines(deployment: Deployment, role: str) -> list[str]:
    return [f"http://{e['host']}:{e['port']}" for e in deployment.state.engines if e["role"] == role]


def _by_source(urls: list[str], source: str) -> float:
    return sum(metric(url, "vllm:prompt_tokens_by_source_total", source=source) for url in urls)


def test_sixteen_engines_on_four_nodes_all_healthy(deployment: Deployment) -> None:
    engines = deployment.state.engines
    assert len(engines) == PREFILL + DECODE
    assert {e["state"] for e in engines} == {"healthy"}
    per_node = {simulated_node_address(n): sum(e["host"] == simulated_node_address(n) for e in engines) for n in range(NODES)}
    assert per_node == {simulated_node_address(n): 4 for n in range(NODES)}
    status = run_cli("status", deployment.env, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith(("prefill-", "decode-"))]
    assert sorted(row[0] for row in rows) == sorted(str(e["name"]) for e in engines)
    assert {row[5] for row in rows} == {"healthy"}


def test_a_pd_request_hands_over_its_prompt(deployment: Deployment) -> None:
    """A 600-token prompt (more than SELECTIVE_PD_TOKENS): prefilled on one engine, the
    decode loads all of it but the last token, and the answer has vLLM's form."""
    decodes, prefills = _engines(deployment, "decode"), _engines(deployment, "prefill")
    external, computed = _by_source(decodes, "external_kv_transfer"), _by_source(prefills, "local_compute")
    body = {"model": deployment.state.served_model_name, "prompt": token_prompt(600), "max_tokens": 7}
    answer = httpx.post(f"{deployment.url}/v1/completions", json=body, timeout=60).json()
    assert answer["usage"] == {"prompt_tokens": 600, "completion_tokens": 7, "total_tokens": 607}
    assert answer["choices"][0]["finish_reason"] == "length"
    assert _by_source(decodes, "external_kv_transfer") - external == 599
    assert _by_source(prefills, "local_compute") - computed == 600


def test_kv_aware_routing_sends_a_shared_prefix_to_its_holders(deployment: Deployment) -> None:
    """Out of 8 engines a role, both legs of a prompt sharing a 7-block head with an
    earlier one go to the engines holding it (the door follows their KV events): each
    finds the 896 tokens in its own cache."""
    engines = _engines(deployment, "prefill") + _engines(deployment, "decode")
    head = token_prompt(7 * BLOCK + 50)[: 7 * BLOCK]
    model = deployment.state.served_model_name
    httpx.post(f"{deployment.url}/v1/completions", json={"model": model, "prompt": head + [5] * 100, "max_tokens": 2},
               timeout=60).raise_for_status()  # fmt: skip
    hits = _by_source(engines, "local_cache_hit")
    time.sleep(0.5)  # the engines published their blocks before answering; the door applies them at once
    body = {"model": model, "prompt": head + [9] * 300, "max_tokens": 2}
    httpx.post(f"{deployment.url}/v1/completions", json=body, timeout=60).raise_for_status()
    assert _by_source(engines, "local_cache_hit") - hits == 2 * 7 * BLOCK


def test_streams_chat_and_bad_input_answer_as_vllm(deployment: Deployment) -> None:
    model = deployment.state.served_model_name
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{deployment.url}/v1/chat/completions", json=chat, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 3
    too_long = httpx.post(f"{deployment.url}/v1/completions", json={"model": model, "prompt": token_prompt(5000),
                                                                    "max_tokens": 1}, timeout=60)  # fmt: skip
    assert too_long.status_code == 400
    assert "maximum context length is 4096 tokens" in too_long.json()["error"]["message"]


def test_clean_stops_every_simulated_engine(deployment: Deployment) -> None:
    pids = [int(e["pid"]) for e in deployment.state.engines]  # type: ignore[call-overload]
    assert all(pid_alive(pid) for pid in pids)
    result = run_cli("clean", deployment.env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert pids_matching(deployment.env["YR_SESSIONS_DIR"]) == []
