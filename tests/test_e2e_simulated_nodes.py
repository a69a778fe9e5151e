"""End to end: 1P1D on two simulated nodes (SIMULATED_NODES=2, local mode).

Each node has its own loopback address (127.0.0.2, 127.0.0.3), its own data system
worker (the two joined in one cluster) and one of the two cores. The planner puts the
prefill on one node and the decode on the other; each engine binds to its node's
address and attaches to its node's worker, so a PD handoff goes worker to worker.

One deployment shared by the tests (each passes alone too); the last one cleans.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import simulated_node_address
from common.processes import pid_alive
from testkit.deployment import (
    PROMPT_IDS,
    PROMPT_LENGTHS,
    Deployment,
    complete,
    deployed,
    external_kv_tokens,
    same_greedy_output,
    token_prompt,
)
from testkit.helpers import listening_addresses, pids_matching, process_tree, run_cli

pytestmark = pytest.mark.e2e

NODE_ADDRESS = {"prefill-0": simulated_node_address(0), "decode-0": simulated_node_address(1)}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # SELECTIVE_PD_TOKENS=0: every request takes both legs, across the two nodes' workers.
    with deployed(tmp_path_factory.mktemp("simulated-nodes"), SIMULATED_NODES="2", VISIBLE_DEVICES="0,1",
                  SELECTIVE_PD_TOKENS="0") as running:
        yield running


def _worker_port(deployment: Deployment) -> str:
    return deployment.env["DS_WORKER_ADDRESS"].rpartition(":")[2]


def _listens(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def test_engines_run_on_their_nodes_and_attach_to_their_workers(deployment: Deployment) -> None:
    port = _worker_port(deployment)
    placed = {
        str(e["name"]): (e["node_id"], e["host"], e["ds_worker_address"], tuple(e["devices"]))  # type: ignore[arg-type]
        for e in deployment.state.engines
    }
    assert placed == {
        "prefill-0": ("sim-node-0", "127.0.0.2", f"127.0.0.2:{port}", (0,)),
        "decode-0": ("sim-node-1", "127.0.0.3", f"127.0.0.3:{port}", (1,)),
    }
    # Each engine binds to its node's address only, and its connector uses its node's worker.
    log_dir = Path(deployment.env["YR_SESSIONS_DIR"]) / "latest" / "log"
    for engine in deployment.state.engines:
        name, engine_port = str(engine["name"]), int(engine["port"])  # type: ignore[call-overload]
        listening = {address for address in listening_addresses(process_tree(int(engine["pid"]))) if address[1] == engine_port}  # type: ignore[call-overload]
        assert listening == {(str(engine["host"]), engine_port)}
        match = re.search(r"\[connector rank=0\] registered .* store (\S+)", (log_dir / f"{name}.log").read_text())
        assert match and match.group(1) == f"{NODE_ADDRESS[name]}:{port}"
    assert deployment.state.ds_worker_address == f"127.0.0.2:{port},127.0.0.3:{port}"


def test_status_shows_both_nodes_with_their_worker_and_engine(deployment: Deployment) -> None:
    status = run_cli("status", deployment.env, timeout=120)
    assert status.returncode == 0, status.stderr
    port = _worker_port(deployment)
    engines = {str(e["name"]): f"{e['host']}:{e['port']}" for e in deployment.state.engines}
    engine_rows = [line.split()[:4] for line in status.stdout.splitlines() if line.startswith(("prefill-", "decode-"))]
    assert engine_rows == [["prefill-0", "prefill", "0", engines["prefill-0"]], ["decode-0", "decode", "1", engines["decode-0"]]]
    assert engines["prefill-0"].startswith("127.0.0.2:") and engines["decode-0"].startswith("127.0.0.3:")
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("sim-node-")]
    assert rows == [
        ["sim-node-0", "127.0.0.2", "0", f"127.0.0.2:{port}", "answers", "prefill-0"],
        ["sim-node-1", "127.0.0.3", "1", f"127.0.0.3:{port}", "answers", "decode-0"],
    ]


@pytest.mark.parametrize("prompt_tokens", PROMPT_LENGTHS, ids=PROMPT_IDS)
def test_handoff_crosses_workers_and_output_equals_recompute(deployment: Deployment, prompt_tokens: int) -> None:
    """The decode (node 1, worker B) loads every prompt token but the last, which the
    prefill (node 0) stored through worker A; greedy output equals the prefill engine computing alone."""
    body = {"prompt": token_prompt(prompt_tokens), "max_tokens": 12, "temperature": 0, "logprobs": 2}
    decode_url = deployment.engine_url("decode")
    before = external_kv_tokens(decode_url)
    through_pd = complete(deployment.url, body)
    assert external_kv_tokens(decode_url) - before == prompt_tokens - 1  # all but the last token
    assert same_greedy_output(through_pd, deployment.engine_complete("prefill", body))


def test_clean_stops_every_node_worker_and_engine(deployment: Deployment) -> None:
    port = _worker_port(deployment)
    pids = [deployment.state.pid] + [int(e["pid"]) for e in deployment.state.engines]  # type: ignore[call-overload]
    result = run_cli("clean", deployment.env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [pid for pid in pids if pid_alive(pid)] == []
    for node in range(2):
        address = f"{simulated_node_address(node)}:{port}"
        assert pids_matching(f"--worker_address={address}") == []
        assert not _listens(simulated_node_address(node), int(port))
