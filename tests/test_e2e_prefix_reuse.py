"""End to end: PD-colocated instances reuse each other's prompts through the data
system (USING_PREFIX_CONNECTOR=1), across two simulated nodes (SIMULATED_NODES=2): instance
0 runs on node 0 (127.0.0.2) and attaches to its worker A, instance 1 on node 1
(127.0.0.3) with worker B.

One deployment shared by the tests; each uses prompts of its own and takes its own
baselines, so each passes alone too. The fixture cleans.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.state import DeploymentState
from testkit.deployment import (
    BLOCK_SIZE,
    Deployment,
    complete,
    deployed,
    external_kv_tokens,
    metric,
    same_greedy_output,
    token_prompt,
)
from testkit.helpers import run_cli, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(
        tmp_path_factory.mktemp("reuse"),
        PREFILL_INS_NUM="2",
        DECODE_INS_NUM="0",
        SIMULATED_NODES="2",
        VISIBLE_DEVICES="0,1",
        USING_PREFIX_CONNECTOR="1",
    ) as running:
        yield running


def _body(prompt: list[int]) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1}


def test_instances_attach_to_different_workers(deployment: Deployment) -> None:
    log_dir = Path(deployment.env["YR_SESSIONS_DIR"]) / "latest" / "log"
    stores = {}
    for name in ("colocated-0", "colocated-1"):
        match = re.search(r"\[connector rank=0\] registered .* store (\S+)", (log_dir / f"{name}.log").read_text())
        assert match, f"{name} logged no connector registration"
        stores[name] = match.group(1)
    port = deployment.env["DS_WORKER_ADDRESS"].rpartition(":")[2]
    assert stores == {"colocated-0": f"127.0.0.2:{port}", "colocated-1": f"127.0.0.3:{port}"}


def _stored_blocks(url: str) -> float:
    """Blocks an engine saved or found already stored (its stats reach /metrics every 10 s)."""
    return metric(url, "vllm:yuanrong_kv_blocks_total", op="save") + metric(url, "vllm:yuanrong_kv_blocks_total", op="save_present")


def _wait_for_stored_blocks(url: str, count: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _stored_blocks(url) < count:
        assert time.monotonic() < deadline, f"{url} reported {_stored_blocks(url):.0f} blocks stored, waited for {count:.0f}"
        time.sleep(0.5)


def test_prompt_computed_on_one_instance_is_loaded_by_the_other_through_another_worker(deployment: Deployment) -> None:
    prompt = token_prompt(4 * BLOCK_SIZE + 9)
    first_url = deployment.engine_url("colocated-0")
    stored_before = _stored_blocks(first_url)
    first = deployment.engine_complete("colocated-0", _body(prompt))
    _wait_for_stored_blocks(first_url, stored_before + 4)  # saves are published after the response
    other_url = deployment.engine_url("colocated-1")
    before = external_kv_tokens(other_url)
    second = deployment.engine_complete("colocated-1", _body(prompt))
    assert external_kv_tokens(other_url) - before == 4 * BLOCK_SIZE
    assert same_greedy_output(first, second)


def test_shared_prefix_is_reused_and_the_rest_computed(deployment: Deployment) -> None:
    prefix = [(13 * i + 5) % 4000 + 10 for i in range(2 * BLOCK_SIZE)]
    storing_url = deployment.engine_url("colocated-1")
    stored_before = _stored_blocks(storing_url)
    deployment.engine_complete("colocated-1", _body(prefix + [42] * 30))  # stores the prefix via worker B
    _wait_for_stored_blocks(storing_url, stored_before + 2)  # saves are published after the response
    other_url = deployment.engine_url("colocated-0")
    before = external_kv_tokens(other_url)
    with_new_suffix = prefix + [(17 * i) % 4000 + 10 for i in range(70)]
    reused = deployment.engine_complete("colocated-0", _body(with_new_suffix))
    assert external_kv_tokens(other_url) - before == 2 * BLOCK_SIZE
    # the same prompt computed with nothing from the store (other instance's own cache has only the prefix)
    assert same_greedy_output(reused, deployment.engine_complete("colocated-1", _body(with_new_suffix)))


def test_blocks_already_stored_are_not_written_again(deployment: Deployment) -> None:
    url = deployment.engine_url("colocated-0")
    prompt = [token + 11 for token in token_prompt(4 * BLOCK_SIZE + 9)]  # this test's own
    stored_before = _stored_blocks(url)
    deployment.engine_complete("colocated-0", _body(prompt))  # computed: its 4 full blocks saved
    _wait_for_stored_blocks(url, stored_before + 4)
    present_before = metric(url, "vllm:yuanrong_kv_blocks_total", op="save_present")
    written_before = metric(url, "vllm:yuanrong_kv_blocks_total", op="save")
    deployment.engine_complete("colocated-0", _body(prompt))  # again: a local hit
    # Its 4 full blocks come from vLLM's own cache; the connector offers them to the store
    # again (another worker may lack them), finds all 4 there and writes none.
    wait_for(lambda: metric(url, "vllm:yuanrong_kv_blocks_total", op="save_present") >= present_before + 4, 30,
             "the 4 stored blocks found present")  # fmt: skip
    assert metric(url, "vllm:yuanrong_kv_blocks_total", op="save_present") == present_before + 4
    assert metric(url, "vllm:yuanrong_kv_blocks_total", op="save") == written_before


def test_killed_engine_is_routed_around_and_comes_back(deployment: Deployment) -> None:
    """Requests that had not started when an engine died are answered by the other one;
    the engine comes back, and `status` shows its restart."""
    victim = next(e for e in deployment.state.engines if e["name"] == "colocated-0")
    os.killpg(int(victim["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
    for i in range(6):
        body = {"prompt": token_prompt(50 + i), "max_tokens": 4, "temperature": 0, "stream": i % 2 == 1}
        response = httpx.post(f"{deployment.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    metrics = httpx.get(f"{deployment.url}/metrics", timeout=10).text
    assert 'frontdoor_engine_healthy{engine="colocated-0",role="colocated"} 0.0' in metrics
    # Then the supervisor restarts the engine, state.json (what `status` reads) shows the
    # new pid and the restart, and the door routes to it again.
    killed = victim
    state_file = Path(deployment.env["RUN_DIR"]) / "state.json"
    deadline = time.monotonic() + 240
    while True:
        state = DeploymentState.read(state_file)
        engine = next((e for e in state.engines if e["name"] == "colocated-0"), None) if state else None
        if engine is not None and engine["state"] == "healthy" and engine["pid"] != killed["pid"]:
            break
        assert time.monotonic() < deadline, f"colocated-0 not back within 240 s: {engine}"
        time.sleep(2)
    assert engine["restarts"] == 1
    status = run_cli("status", deployment.env, timeout=60)
    row = next(line.split() for line in status.stdout.splitlines() if line.startswith("colocated-0 "))
    assert row[4:7] == [str(engine["pid"]), "healthy", "1"]  # PID, HEALTH, RESTARTS
    gauge = 'frontdoor_engine_healthy{engine="colocated-0",role="colocated"}'
    deadline = time.monotonic() + 30
    while f"{gauge} 1.0" not in httpx.get(f"{deployment.url}/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the door did not route to the restarted engine again"
        time.sleep(1)
    restarted_url = f"http://{engine['host']}:{engine['port']}"
    answer = complete(restarted_url, {"prompt": token_prompt(30), "max_tokens": 4, "model": deployment.state.served_model_name})
    assert len(answer["choices"][0]["text"]) > 0  # type: ignore[index]
