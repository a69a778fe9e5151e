"""End to end: vLLM's own data parallelism across two simulated nodes (DP_MODE=vllm,
SIMULATED_NODES=2, one colocated instance with PDP=2).

Rank 0 runs on sim-node-0 as the head (vLLM's API server and DP coordinator); rank 1 on
sim-node-1 as a headless engine that joins the head's DP group at its node's address
and attaches to its own node's data system worker. Requests through the door reach the
head, which spreads them over both ranks.

One deployment shared by the tests (each passes alone too); the fixture cleans.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.processes import pid_alive
from testkit.deployment import Deployment, complete, deployed, token_prompt
from testkit.helpers import pids_matching, run_cli
from testkit.metrics import metric

pytestmark = pytest.mark.e2e

REQUESTS = 8


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(
        tmp_path_factory.mktemp("dp-vllm"), SIMULATED_NODES="2", VISIBLE_DEVICES="0,1", DECODE_INS_NUM="0",
        PREFILL_INS_NUM="1", PDP="2", DP_MODE="vllm",
    ) as running:  # fmt: skip
        yield running


def test_head_on_node_0_and_a_headless_rank_on_node_1(deployment: Deployment) -> None:
    port = deployment.env["DS_WORKER_ADDRESS"].rpartition(":")[2]
    engines = {
        str(e["name"]): (e["node_id"], e["host"], e["ds_worker_address"], e["headless"], e["port"] == 0)
        for e in deployment.state.engines
    }
    assert engines == {
        "colocated-0": ("sim-node-0", "127.0.0.2", f"127.0.0.2:{port}", False, False),
        "colocated-0-node1": ("sim-node-1", "127.0.0.3", f"127.0.0.3:{port}", True, True),
    }
    log_dir = Path(deployment.env["YR_SESSIONS_DIR"]) / "latest" / "log"
    headless_log = (log_dir / "colocated-0-node1.log").read_text()
    registered = re.search(r"\[connector rank=0\] registered .* store (\S+)", headless_log)
    assert registered and registered.group(1) == f"127.0.0.3:{port}"  # rank 1 uses its own node's worker
    status = run_cli("status", deployment.env, timeout=120)
    rows = [line.split()[:6] for line in status.stdout.splitlines() if line.startswith("colocated-")]
    assert [(row[0], row[5]) for row in rows] == [("colocated-0", "healthy"), ("colocated-0-node1", "headless")]


def test_requests_through_the_door_are_served_by_both_ranks(deployment: Deployment) -> None:
    head = deployment.engine_url("colocated-0")

    def served(rank: str) -> float:
        return metric(head, "vllm:request_success_total", engine=rank)

    before = {rank: served(rank) for rank in ("0", "1")}
    bodies = [{"prompt": token_prompt(40 + i), "max_tokens": 8, "temperature": 0} for i in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda body: complete(deployment.url, body), bodies))
    assert [a["usage"]["completion_tokens"] for a in answers] == [8] * REQUESTS  # type: ignore[index]
    done = {rank: served(rank) - before[rank] for rank in ("0", "1")}
    assert done["0"] + done["1"] == REQUESTS
    assert done["0"] > 0 and done["1"] > 0, f"vLLM's DP coordinator used one rank only: {done}"


def test_clean_stops_the_head_and_the_headless_rank(deployment: Deployment) -> None:
    pids = [int(e["pid"]) for e in deployment.state.engines]  # type: ignore[call-overload]
    result = run_cli("clean", deployment.env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert pids_matching("--data-parallel-address 127.0.0.2") == []  # neither the head nor the headless rank
