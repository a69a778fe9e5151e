"""End to end on real components: `run_vllm_on_yr.sh deploy` brings up 1P1D with the
embedded model (openYuanrong SDK local mode, a real data system worker, two real vLLM
engines); requests go through the front door; `clean` leaves nothing behind.

The tests share one deployment; each takes its own baseline, so each passes alone too
(the last one cleans, whatever ran before it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.processes import pid_alive
from testkit.deployment import (
    BLOCK_SIZE,
    PROMPT_IDS,
    PROMPT_LENGTHS,
    Deployment,
    deployed,
    same_greedy_output,
    token_prompt,
)
from testkit.deployment import complete as _complete
from testkit.deployment import external_kv_tokens as _external_kv_tokens
from testkit.helpers import pids_matching, port_open, run_cli, wait_for
from testkit.metrics import metric
from tests.malformed import malformed_requests, run_battery

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Every request takes both legs (SELECTIVE_PD_TOKENS=0): the handoff is what these
    # tests check; selective PD has its own (tests/test_e2e_kv_routing.py).
    with deployed(tmp_path_factory.mktemp("pd"), SELECTIVE_PD_TOKENS="0") as running:
        yield running


@pytest.fixture(scope="module")
def colocated_reference(
    tmp_path_factory: pytest.TempPathFactory, colocated_outputs: dict[int, dict[str, object]]
) -> dict[int, dict[str, object]]:
    """A colocated deployment's greedy outputs: recorded by test_e2e_colocated in a whole
    run, computed here on a deployment of its own when this module runs alone."""
    if not all(length in colocated_outputs for length in PROMPT_LENGTHS):
        with deployed(tmp_path_factory.mktemp("colocated-reference"), DECODE_INS_NUM="0", PREFILL_INS_NUM="1") as running:
            for length in PROMPT_LENGTHS:
                body = {"prompt": token_prompt(length), "max_tokens": 12, "temperature": 0}
                colocated_outputs[length] = _complete(running.url, body)["choices"][0]  # type: ignore[index]
    return colocated_outputs


def test_models_lists_the_served_model(deployment: Deployment) -> None:
    models = httpx.get(f"{deployment.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [deployment.state.served_model_name]


def test_non_streaming_completion(deployment: Deployment) -> None:
    answer = _complete(deployment.url, {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    choice = answer["choices"][0]  # type: ignore[index]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert answer["usage"]["completion_tokens"] == 8  # type: ignore[index]


def test_streaming_completion(deployment: Deployment) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", f"{deployment.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 6
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    whole = _complete(deployment.url, {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})
    assert streamed == whole["choices"][0]["text"]  # type: ignore[index]


@pytest.mark.parametrize("prompt_tokens", PROMPT_LENGTHS, ids=PROMPT_IDS)
def test_pd_output_equals_one_instance_computing_alone(
    deployment: Deployment, prompt_tokens: int, colocated_reference: dict[int, dict[str, object]]
) -> None:
    """Greedy tokens and their log-probabilities through PD (KV loaded from the data
    system) equal those of one engine that computes the whole prompt itself, and those
    of a colocated deployment."""
    body = {"prompt": token_prompt(prompt_tokens), "max_tokens": 12, "temperature": 0, "logprobs": 2}
    decode_url = deployment.engine_url("decode")
    loaded_before = _external_kv_tokens(decode_url)
    through_pd = _complete(deployment.url, body)["choices"][0]  # type: ignore[index]
    loaded = _external_kv_tokens(decode_url) - loaded_before
    alone = _complete(deployment.engine_url("prefill"), {**body, "model": deployment.state.served_model_name})["choices"][0]  # type: ignore[index]
    assert through_pd["text"] == alone["text"]
    assert through_pd["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    assert through_pd["logprobs"]["token_logprobs"] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=0.05)
    assert through_pd["text"] == colocated_reference[prompt_tokens]["text"]
    # every prompt token but the last came from the store, the partial last block's too
    assert loaded == prompt_tokens - 1


@pytest.mark.parametrize("past_boundary", (1, 2, 127, 128, 129))
def test_the_partial_last_block_is_handed_over_and_the_decode_computes_one_token(
    deployment: Deployment, past_boundary: int
) -> None:
    """Prompts ending 1, 2, 127, 128 and 129 tokens past a block boundary: the decode loads
    every token but the last (the prefill saved the partial last block too) and computes
    only that one, and the greedy output equals the prefill engine computing alone."""
    prompt_tokens = BLOCK_SIZE + past_boundary
    prompt = token_prompt(prompt_tokens)[::-1]  # no block in common with the other tests' prompts
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2}
    decode_url = deployment.engine_url("decode")
    loaded_before, computed_before = _external_kv_tokens(decode_url), _local_compute(decode_url)
    through_pd = _complete(deployment.url, body)
    assert _external_kv_tokens(decode_url) - loaded_before == prompt_tokens - 1
    assert _local_compute(decode_url) - computed_before == 1
    alone = deployment.engine_complete("prefill", {**body, "cache_salt": f"alone-{past_boundary}"})
    assert same_greedy_output(through_pd, alone)


def _local_compute(engine_url: str) -> float:
    return metric(engine_url, "vllm:prompt_tokens_by_source_total", source="local_compute")


def test_shared_prefix_with_different_suffixes_loads_the_prefix(deployment: Deployment) -> None:
    """Two prompts share two blocks and differ after them. For the first, the decode
    engine loads all three full blocks and the partial fourth (but its last token) from
    the store; for the second, the shared two are already in its own device prefix cache
    and only the rest is loaded. Both outputs equal an engine computing alone."""
    prefix = token_prompt(2 * BLOCK_SIZE)
    decode_url = deployment.engine_url("decode")
    for suffix_seed, loaded_blocks in ((1, 3), (2, 1)):
        prompt = prefix + [(31 * i + suffix_seed) % 4000 + 10 for i in range(BLOCK_SIZE + 40)]
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
        before = _external_kv_tokens(decode_url)
        through_pd = _complete(deployment.url, body)
        assert _external_kv_tokens(decode_url) - before == loaded_blocks * BLOCK_SIZE + 39  # the 40-token tail but its last
        assert same_greedy_output(through_pd, deployment.engine_complete("prefill", body))


def test_connector_numbers_are_on_the_engines_metrics(deployment: Deployment) -> None:
    """One new prompt of 3 full blocks and 20 tokens: the prefill saves its 4 blocks (the
    partial last one too), the decode loads them in one load and counts their bytes, and
    its external prefix-cache hits are every prompt token but the last."""
    prefill_url, decode_url = deployment.engine_url("prefill"), deployment.engine_url("decode")
    numbers = {
        "saved": (prefill_url, "vllm:yuanrong_kv_blocks_total", {"op": "save"}),
        "loaded": (decode_url, "vllm:yuanrong_kv_blocks_total", {"op": "load"}),
        "loaded_bytes": (decode_url, "vllm:yuanrong_kv_bytes_total", {"op": "load"}),
        "loads": (decode_url, "vllm:yuanrong_kv_op_seconds_count", {"op": "load"}),
        "hits": (decode_url, "vllm:external_prefix_cache_hits_total", {}),
    }

    def read() -> dict[str, float]:
        return {key: metric(url, name, **labels) for key, (url, name, labels) in numbers.items()}

    before = read()
    prompt = [token + 7 for token in token_prompt(3 * BLOCK_SIZE + 20)]  # no block in common with the other tests'
    _complete(deployment.url, {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    # 2 layers x K,V x 2 KV heads x 128 tokens x 64 x 4 bytes (float32) per block
    expected = {"saved": 4, "loaded": 4, "loaded_bytes": 4 * 262144, "loads": 1, "hits": 3 * BLOCK_SIZE + 19}
    wait_for(lambda: {key: value - before[key] for key, value in read().items()} == expected, 30,
             f"the engines' connector counters to move by {expected}")  # fmt: skip


def test_seed_000_curl_example_works_unchanged(deployment: Deployment) -> None:
    command = """curl -X POST "http://${SERVER_IP}:${SERVER_PORT}/v1/completions" \\
     -H "Content-Type: application/json" \\
     -d '{
          "model": "'"${MODEL_PATH}"'",
          "prompt": "Introduce Beijing Forbidden City from the perspectives of geographical location, historical status, and political status",
          "max_tokens": 50,
          "temperature": 0
        }'"""
    env = {**os.environ, "SERVER_IP": "127.0.0.1", "SERVER_PORT": deployment.env["SERVER_PORT"],
           "MODEL_PATH": deployment.state.served_model_name}  # fmt: skip
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    answer = json.loads(result.stdout)
    assert answer["model"] == deployment.state.served_model_name
    assert answer["usage"]["completion_tokens"] == 50
    assert answer["choices"][0]["finish_reason"] == "length"


def test_openai_client_completions_and_chat_streaming_and_not(deployment: Deployment) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)
    model = deployment.state.served_model_name
    whole = client.completions.create(model=model, prompt="Hello there", max_tokens=6, temperature=0)
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    streamed = client.completions.create(model=model, prompt="Hello there", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    messages = [{"role": "user", "content": "Say something about the sea."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert chat.usage is not None and chat.usage.completion_tokens == 6 and chat.choices[0].message.role == "assistant"
    chat_stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices) == chat.choices[0].message.content


def test_vllm_bench_serve_runs_against_the_door(deployment: Deployment, tmp_path: Path) -> None:
    model = deployment.state.served_model_name
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
               "--base-url", deployment.url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model,
               "--dataset-name", "random", "--random-input-len", "200", "--random-output-len", "8", "--ignore-eos",
               "--num-prompts", "8", "--max-concurrency", "4", "--temperature", "0",
               "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 64


def test_door_metrics_count_requests_latency_and_kv_tokens(deployment: Deployment) -> None:
    """One completion and one chat through the door: each endpoint's 200 counter and
    latency count move by one, nothing stays in flight, and the door's copy of the
    decode's KV-transfer counter catches up with the engine's own (scraped every 5 s)."""
    door, decode_url = deployment.url, deployment.engine_url("decode")
    series = {endpoint: ('frontdoor_requests_total', {"endpoint": endpoint, "status": "200"})
              for endpoint in ("completions", "chat/completions")}  # fmt: skip
    series |= {f"{endpoint} latency": ("frontdoor_request_latency_seconds_count", {"endpoint": endpoint})
               for endpoint in ("completions", "chat/completions")}  # fmt: skip

    def read() -> dict[str, float]:
        return {key: metric(door, name, **labels) for key, (name, labels) in series.items()}

    before = read()
    _complete(door, {"prompt": token_prompt(40), "max_tokens": 2, "temperature": 0})
    chat = httpx.post(f"{door}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                      timeout=120)  # fmt: skip
    assert chat.status_code == 200, chat.text
    wait_for(lambda: {key: value - before[key] for key, value in read().items()} == dict.fromkeys(series, 1), 10,
             "each endpoint's request and latency counts to move by one")  # fmt: skip
    assert metric(door, "frontdoor_in_flight_requests", engine="decode-0", role="decode") == 0
    wait_for(lambda: metric(door, "frontdoor_engine_kv_tokens", engine="decode-0", source="external_kv_transfer")
             == _external_kv_tokens(decode_url), 30, "the door's copy of the decode's KV-transfer tokens")  # fmt: skip


def test_bad_requests_get_openai_errors(deployment: Deployment) -> None:
    bad_json = httpx.post(f"{deployment.url}/v1/completions", content=b"{oops", timeout=10)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    wrong_model = httpx.post(f"{deployment.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=10)
    assert wrong_model.status_code == 404 and "gpt-9" in wrong_model.json()["error"]["message"]
    too_long = httpx.post(f"{deployment.url}/v1/completions", json={"prompt": "x", "max_tokens": 10**7}, timeout=30)
    assert too_long.status_code == 400 and "error" in too_long.json()


def test_malformed_battery_gets_4xx_and_leaves_the_service_serving(deployment: Deployment) -> None:
    """100 malformed requests (every kind of tests/malformed.py 4 times): no 5xx, every
    error in OpenAI's form, and the same greedy answer afterwards as before."""
    body = {"prompt": token_prompt(40), "max_tokens": 6, "temperature": 0}
    before = _complete(deployment.url, body)["choices"][0]["text"]  # type: ignore[index]
    cases = malformed_requests(100, seed=0, model=deployment.state.served_model_name, vocab_size=4096, max_model_len=8192)
    report = asyncio.run(run_battery(deployment.url, cases, concurrency=4))
    assert report.server_errors == [] and report.transport_errors == [], report.summary()
    assert report.not_openai_form == [], report.summary()
    assert httpx.get(f"{deployment.url}/health", timeout=10).status_code == 200
    assert _complete(deployment.url, body)["choices"][0]["text"] == before  # type: ignore[index]


def test_status_shows_each_engine_healthy(deployment: Deployment) -> None:
    result = run_cli("status", deployment.env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("prefill-", "decode-"))]
    assert [(row[0], row[1], row[5]) for row in rows] == [("prefill-0", "prefill", "healthy"), ("decode-0", "decode", "healthy")]
    assert {row[2] for row in rows} == {"0", "1"}  # disjoint CPU cores


def test_logs_are_where_the_docs_say(deployment: Deployment) -> None:
    log_dir = Path(deployment.env["YR_SESSIONS_DIR"]) / "latest" / "log"
    assert "Application startup complete" in (log_dir / "prefill-0.log").read_text()
    assert "Application startup complete" in (log_dir / "decode-0.log").read_text()
    assert "front door ready" in (Path(deployment.env["RUN_DIR"]) / "deploy.log").read_text()


def test_clean_leaves_no_process_port_or_worker(deployment: Deployment) -> None:
    pids = [deployment.state.pid] + [int(e["pid"]) for e in deployment.state.engines]  # type: ignore[arg-type]
    ports = [int(deployment.env["SERVER_PORT"])] + [int(e["port"]) for e in deployment.state.engines]  # type: ignore[arg-type]
    ds_address = deployment.env["DS_WORKER_ADDRESS"]
    # A stream in flight when clean starts is drained: it ends with all its tokens.
    started, chunks = threading.Event(), []
    body = {"prompt": token_prompt(20), "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    def stream() -> None:
        with httpx.stream("POST", f"{deployment.url}/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120), "the stream did not start"
    result = run_cli("clean", deployment.env, timeout=300)
    reader.join(60)
    assert result.returncode == 0, result.stderr
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks if chunk.get("usage")] == [200]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["length"]
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert [port for port in ports if port_open(port)] == []
    assert pids_matching(f"--worker_address={ds_address}") == []
    assert not (Path(deployment.env["RUN_DIR"]) / "deploy.pid").exists()
