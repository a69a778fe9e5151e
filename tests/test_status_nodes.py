"""`status`'s nodes: one row per node the engines run on (planner id, address, devices, the
data system worker(s) they attach to and whether those answer, the engines), and in
cluster mode what `yr status` says. States are built here as state.json holds them."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from common.config import Accelerator, Role
from common.processes import write_pid
from controller.planner import InstanceRequest, Node, PlacementRequest, plan_placement
from deploy.cli import status
from deploy.config import build_config
from deploy.datasystem import worker_listens
from deploy.node_status import (
    NODE_HEADER,
    YR_STATUS_TITLE,
    engine_workers,
    node_rows,
    table_lines,
    yr_cli_path,
    yr_status_lines,
)
from deploy.state import DeploymentState
from testkit.helpers import free_port
from workers.engine_actor import EngineActor
from workers.engine_process import EngineSpec


def _engine(name: str, host: str, devices: list[int], node_id: str | None = None, worker: str | None = None,
            port: int = 8000) -> dict[str, object]:  # fmt: skip
    """An engine as state.json holds it; node_id/worker None: written before EngineInfo had them."""
    engine: dict[str, object] = {
        "name": name, "instance": name.split("-dp")[0], "role": name.split("-")[0], "devices": devices, "host": host,
        "port": port, "pid": 4242, "log": f"/tmp/yr_sessions/latest/log/{name}.log", "restarts": 0, "state": "healthy",
        "events_port": 0,
    }  # fmt: skip
    if node_id is not None:
        engine["node_id"] = node_id
    if worker is not None:
        engine["ds_worker_address"] = worker
    return engine


def _state(engines: list[dict[str, object]], mode: str = "cluster", ds: str = "each node's, port 31501",
           pid: int = 1) -> DeploymentState:  # fmt: skip
    return DeploymentState(pid=pid, endpoint="http://10.0.0.1:9000", yr_mode=mode, served_model_name="/models/qwen",
                           ds_worker_address=ds, ds_started_here=mode == "local", log_dir="/tmp/yr_sessions/latest/log",
                           engines=engines)  # fmt: skip


def _probe(answering: set[str], asked: list[str]) -> Callable[[str], bool]:
    def answers(address: str) -> bool:
        asked.append(address)
        return address in answering

    return answers


# Two prefill engines on one node, the decode engine on another (cluster mode, planned from
# the resource view: node ids are openYuanrong's agent ids; the runtime chose the devices, so
# the engines carry none).
NODE_1, NODE_2 = "function-agent-10.0.0.1-25742", "function-agent-10.0.0.2-25742"
TWO_NODES = [
    _engine("prefill-0", "10.0.0.2", [], NODE_2, "10.0.0.2:31501"),
    _engine("prefill-1", "10.0.0.2", [], NODE_2, "10.0.0.2:31501"),
    _engine("decode-0", "10.0.0.1", [], NODE_1, "10.0.0.1:31501"),
]


def test_two_engines_on_one_node_and_one_on_another() -> None:
    asked: list[str] = []
    rows = node_rows(_state(TWO_NODES), _probe({"10.0.0.1:31501", "10.0.0.2:31501"}, asked))
    assert rows == [
        (NODE_2, "10.0.0.2", "-", "10.0.0.2:31501", "answers", "prefill-0,prefill-1"),
        (NODE_1, "10.0.0.1", "-", "10.0.0.1:31501", "answers", "decode-0"),
    ]
    assert asked == ["10.0.0.2:31501", "10.0.0.1:31501"]  # each worker probed once


def test_engine_infos_without_node_or_worker_get_their_nodes_worker_in_cluster_mode() -> None:
    """state.json written before engines carried their worker: the worker on each engine's
    own node at the port serve.py recorded; no planner node ("-": the runtime chose)."""
    engines = [_engine("prefill-0", "10.0.0.2", []), _engine("decode-0", "10.0.0.1", [])]
    rows = node_rows(_state(engines, ds="each node's, port 31600"), _probe({"10.0.0.2:31600"}, []))
    assert rows == [
        ("-", "10.0.0.2", "-", "10.0.0.2:31600", "answers", "prefill-0"),
        ("-", "10.0.0.1", "-", "10.0.0.1:31600", "not answering", "decode-0"),
    ]


def test_a_comma_separated_worker_list_is_mapped_as_the_planner_assigns_it() -> None:
    """Local mode with two workers: engines attach to them in turn. Infos that lack the
    worker get the same assignment as the planner's plan (and as infos carrying it)."""
    workers = ("127.0.0.1:31501", "127.0.0.1:31502")
    node = Node(node_id="local", address="127.0.0.1", accelerator=Accelerator.CPU, devices=(), cores=(0, 1, 2),
                ds_worker_addresses=workers)  # fmt: skip
    request = PlacementRequest(
        Accelerator.CPU, (InstanceRequest(Role.PREFILL, 1, 1, 1), InstanceRequest(Role.DECODE, 1, 1, 2))
    )
    plan = plan_placement([node], request)
    assert [p.ds_worker_address for p in plan] == ["127.0.0.1:31501", "127.0.0.1:31502", "127.0.0.1:31501"]
    old = [_engine(p.name, p.node_address, list(p.devices)) for p in plan]
    new = [_engine(p.name, p.node_address, list(p.devices), p.node_id, p.ds_worker_address) for p in plan]
    listed = ",".join(workers)
    assert engine_workers(_state(old, "local", listed)) == [p.ds_worker_address for p in plan]
    assert engine_workers(_state(new, "local", listed)) == [p.ds_worker_address for p in plan]

    rows = node_rows(_state(new, "local", listed), _probe(set(workers), []))
    assert rows == [("local", "127.0.0.1", "0,1,2", listed, "answers", "prefill-0,decode-0-dp0,decode-0-dp1")]


def test_a_worker_that_does_not_answer_is_shown_as_such() -> None:
    rows = node_rows(_state(TWO_NODES), _probe({"10.0.0.1:31501"}, []))
    assert [row[4] for row in rows] == ["not answering", "answers"]

    workers = "127.0.0.1:31501,127.0.0.1:31502"
    engines = [_engine("prefill-0", "127.0.0.1", [0], "local"), _engine("decode-0", "127.0.0.1", [1], "local")]
    rows = node_rows(_state(engines, "local", workers), _probe({"127.0.0.1:31501"}, []))
    assert rows == [("local", "127.0.0.1", "0,1", workers, "not answering: 127.0.0.1:31502", "prefill-0,decode-0")]


def test_the_worker_probe_is_a_tcp_connect() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert worker_listens(address, timeout_s=1.0)
    assert not worker_listens(address, timeout_s=1.0)  # closed now
    assert not worker_listens("each node's, port 31501")


def test_the_engine_info_carries_its_planned_node_and_resolved_worker(tmp_path: Path) -> None:
    """What node_rows reads first: the actor's info names the planner's node and the worker
    on the node it runs on (":port" completed with that node's address)."""
    spec = EngineSpec(
        name="decode-0", instance="decode-0", role=Role.DECODE, accelerator=Accelerator.CPU, tensor_parallel=1,
        devices=(1,), model_path="m", served_model_name="m", startup_params=(), ds_worker_address=":31501",
        prefix_reuse=False, project_root="/p", cache_root="/c", cpu_kvcache_gb=1, node_id="node-0",
    )  # fmt: skip
    info = EngineActor(spec, str(tmp_path), start_timeout_s=30, advertise_host="127.0.0.1").info()  # nothing started
    assert (info["node_id"], info["host"], info["ds_worker_address"]) == ("node-0", "127.0.0.1", "127.0.0.1:31501")


# --- cluster mode: yr status ------------------------------------------------------------------


def test_cluster_mode_without_a_yr_cli_says_it_is_unavailable(tmp_path: Path) -> None:
    yr_path = yr_cli_path(which=lambda name: None, python=str(tmp_path / "bin" / "python"))
    assert yr_path is None
    assert yr_status_lines(_state(TWO_NODES), yr_path) == [
        f"{YR_STATUS_TITLE} unavailable: no yr CLI on PATH (openYuanrong's, as for yr start)"
    ]
    assert yr_status_lines(_state(TWO_NODES, mode="local", ds="127.0.0.1:31501"), yr_path) == []  # no cluster


def test_cluster_mode_prints_yr_status_indented(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "yr"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = status ] || exit 3\n'
        'echo "YuanRong cluster status:"\necho "   current running agents: 2"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    yr_path = yr_cli_path(which=lambda name: None, python=str(bin_dir / "python"))  # found beside the Python
    assert yr_path == str(fake)
    assert yr_status_lines(_state(TWO_NODES), yr_path) == [
        YR_STATUS_TITLE, "    YuanRong cluster status:", "       current running agents: 2",
    ]  # fmt: skip

    def hangs(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, 10)

    assert yr_status_lines(_state(TWO_NODES), "/opt/yr/bin/yr", run=hangs) == [
        f"{YR_STATUS_TITLE} unavailable: /opt/yr/bin/yr status gave no answer within 10 s"
    ]


# --- the status verb: engine table as before, then the nodes ----------------------------------


def test_status_prints_the_engine_table_then_the_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "RUN_DIR": str(tmp_path),
                           "YR_SESSIONS_DIR": str(tmp_path / "yr"), "SERVER_PORT": str(free_port())})  # fmt: skip
    with socket.socket() as listener:  # the first worker answers, the second does not
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        workers = [f"127.0.0.1:{listener.getsockname()[1]}", f"127.0.0.1:{free_port()}"]
        engines = [_engine("prefill-0", "127.0.0.1", [0], "local", workers[0], port=free_port()),
                   _engine("decode-0", "127.0.0.1", [1], "local", workers[1], port=free_port())]  # fmt: skip
        _state(engines, "local", ",".join(workers), pid=os.getpid()).write(config.state_file)
        write_pid(config.pid_file, os.getpid())
        assert status(config) == 0
    lines = capsys.readouterr().out.splitlines()
    # read as test_e2e_pd reads them: the node rows must not pass for engine rows
    engine_rows = [line.split() for line in lines if line.startswith(("prefill-", "decode-"))]
    assert [(row[0], row[1], row[2], row[3], row[5]) for row in engine_rows] == [
        ("prefill-0", "prefill", "0", f"127.0.0.1:{engines[0]['port']}", "unhealthy"),
        ("decode-0", "decode", "1", f"127.0.0.1:{engines[1]['port']}", "unhealthy"),
    ]  # fmt: skip
    assert lines[1] == f"keeper pid {os.getpid()} (deploy.pid: restarts the front door's process, pid {os.getpid()}, if it is killed)"
    assert lines[3].split() == ["INSTANCE", "ROLE", "DEVICES", "ADDRESS", "PID", "HEALTH", "RESTARTS", "LOG"]
    expected = table_lines([NODE_HEADER, ("local", "127.0.0.1", "0,1", ",".join(workers),
                                          f"not answering: {workers[1]}", "prefill-0,decode-0")])  # fmt: skip
    assert lines[-3:] == ["", *expected]  # local mode: no yr status
