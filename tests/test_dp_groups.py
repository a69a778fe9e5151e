"""DP_MODE=vllm: vLLM's own data parallelism on the planner's plan (pure functions, plus
the engine actor supervising a headless stand-in process).

The ranks of an instance on one node become one engine: the rank-0 node's is the head
(HTTP, ``--data-parallel-size-local`` ranks from 0), every other node's is headless
(``--headless --data-parallel-start-rank``), all meeting at the rank-0 node's address and
the instance's RPC port. Plans are synthetic; no vLLM runs here."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

import workers.engine_actor as engine_actor
from common.config import Accelerator, Role
from common.errors import ConfigError
from controller.controller import engine_invoke_options
from controller.dp_groups import DP_RPC_PORT_BASE, dp_rpc_port, vllm_dp_engines
from controller.placement import plan_engines
from controller.planner import InstanceRequest, Node, PlacementError, PlacementRequest, plan_placement
from controller.scaling import Scaler
from deploy.config import build_config
from door.routing import RoutingTable
from testkit.helpers import pids_matching, wait_for
from tests.test_scaling import RecordingControl, ScriptedDoor
from workers.engine_actor import EngineActor
from workers.engine_process import (
    EngineSpec,
    VllmDataParallel,
    build_engine_argv,
    build_engine_env,
    kv_transfer_config,
    resolve_on_node,
)

MODEL = Path("/models/m")
LOCAL = {"YR_SESSIONS_DIR": "/nonexistent/yr_sessions"}  # no yr start master info: local mode
CLUSTER = {"YR_SERVER_ADDRESS": "10.0.0.1:22770"}
SIM_WORKERS = ("127.0.0.2:31501", "127.0.0.3:31501")


def _node(index: int, devices: int = 8) -> Node:
    address = f"10.0.0.{index + 1}"
    return Node(f"node-{index}", address, Accelerator.CUDA, tuple(range(devices)), tuple(range(32)),
                ds_worker_addresses=(f"{address}:31501",))  # fmt: skip


def _kv(spec: EngineSpec) -> str:
    return json.dumps(kv_transfer_config(spec), separators=(",", ":"))


def _layout(specs: list[EngineSpec]) -> list[tuple[str, str, tuple[int, ...], VllmDataParallel | None]]:
    return [(s.name, s.bind_host, s.devices, s.data_parallel) for s in specs]


# --- one node ---------------------------------------------------------------------------


def test_one_node_dp2_is_one_head_running_both_ranks() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "DECODE_INS_NUM": "0", "PDP": "2",
                           "DP_MODE": "vllm", **LOCAL})  # fmt: skip
    (head,) = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    dp = VllmDataParallel(size=2, size_local=2, start_rank=0, address="127.0.0.1", rpc_port=DP_RPC_PORT_BASE)
    assert _layout([head]) == [("colocated-0", "127.0.0.1", (0, 1), dp)]
    assert not head.headless
    assert build_engine_argv(head, 8000, python="py") == [
        "nice", "-n", "5", "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m",
        "--served-model-name", "m", "--host", "127.0.0.1", "--port", "8000", "--tensor-parallel-size", "1",
        "--data-parallel-size", "2", "--data-parallel-size-local", "2", "--data-parallel-address", "127.0.0.1",
        "--data-parallel-rpc-port", "29550", "--kv-transfer-config", _kv(head),
    ]  # fmt: skip
    # vLLM's CPU workers take local DP rank r's lists at [r x TP, (r + 1) x TP): one core each here.
    assert build_engine_env(head, {})["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_cpu_binding_lists_each_local_rank_and_its_tp_ranks_in_order() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-7", "DECODE_INS_NUM": "0", "PDP": "2",
                           "PTP": "2", "CPU_CORES_PER_RANK": "2", "DP_MODE": "vllm", **LOCAL})  # fmt: skip
    (head,) = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    assert build_engine_env(head, {})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3|4,5|6,7"  # [DP0: TP0|TP1, DP1: ...]


def test_independent_stays_the_default_one_server_per_rank() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "DECODE_INS_NUM": "0", "PDP": "2", **LOCAL})
    specs = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",))
    assert [(s.name, s.devices, s.data_parallel) for s in specs] == [("colocated-0-dp0", (0,), None),
                                                                     ("colocated-0-dp1", (1,), None)]  # fmt: skip
    assert not any(arg.startswith("--data-parallel") for arg in build_engine_argv(specs[0], 8000))


# --- across nodes -----------------------------------------------------------------------


def test_two_nodes_dp4_split_two_and_two_is_a_head_and_a_headless_engine() -> None:
    config = build_config({"ACCELERATOR": "cuda", "VISIBLE_DEVICES": "0-3", "SIMULATED_NODES": "2",
                           "DECODE_INS_NUM": "0", "PDP": "4", "DP_MODE": "vllm", **LOCAL})  # fmt: skip
    head, headless = plan_engines(config, MODEL, "m", SIM_WORKERS)
    assert _layout([head, headless]) == [
        ("colocated-0", "127.0.0.2", (0, 1), VllmDataParallel(4, 2, 0, "127.0.0.2", 29550)),
        ("colocated-0-node1", "127.0.0.3", (2, 3), VllmDataParallel(4, 2, 2, "127.0.0.2", 29550)),
    ]
    assert (head.node_id, headless.node_id) == ("sim-node-0", "sim-node-1")
    assert (head.ds_worker_address, headless.ds_worker_address) == SIM_WORKERS  # each its node's worker
    assert (head.headless, headless.headless) == (False, True)
    assert build_engine_argv(head, 8000, python="py") == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m", "--served-model-name", "m",
        "--host", "127.0.0.2", "--port", "8000", "--tensor-parallel-size", "1",
        "--data-parallel-size", "4", "--data-parallel-size-local", "2", "--data-parallel-address", "127.0.0.2",
        "--data-parallel-rpc-port", "29550", "--kv-transfer-config", _kv(head),
    ]  # fmt: skip
    # The api_server module ignores --headless: a headless engine starts through `vllm serve`, with no HTTP.
    assert build_engine_argv(headless, 0, python="py") == [
        "py", "-m", "vllm.entrypoints.cli.main", "serve", "--model", "/models/m", "--served-model-name", "m",
        "--tensor-parallel-size", "1", "--headless", "--data-parallel-size", "4", "--data-parallel-size-local", "2",
        "--data-parallel-start-rank", "2", "--data-parallel-address", "127.0.0.2", "--data-parallel-rpc-port", "29550",
        "--kv-transfer-config", _kv(headless),
    ]  # fmt: skip
    assert build_engine_env(head, {})["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert build_engine_env(headless, {})["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_eight_nodes_dp8_tp8_is_a_head_and_seven_headless_engines() -> None:
    plan = plan_placement([_node(i) for i in range(8)],
                          PlacementRequest(Accelerator.CUDA, (InstanceRequest(Role.DECODE, 1, 8, 8),)))  # fmt: skip
    engines = vllm_dp_engines(plan, cluster_mode=False)
    assert [(e.placement.name, e.placement.node_id, e.placement.devices, e.data_parallel) for e in engines] == [
        (f"decode-0{f'-node{i}' if i else ''}", f"node-{i}", tuple(range(8)),
         VllmDataParallel(size=8, size_local=1, start_rank=i, address="10.0.0.1", rpc_port=29551))
        for i in range(8)
    ]  # fmt: skip


def test_mixed_roles_each_instance_groups_its_own_ranks_with_its_own_port() -> None:
    # The worked example in docs/placement.md: decode-0 (TP4 x DP2) fills node-0, both prefills pack node-1.
    config = build_config({"ACCELERATOR": "cuda", "VISIBLE_DEVICES": "0-15", "PREFILL_INS_NUM": "2", "PTP": "2",
                           "PDP": "2", "DTP": "4", "DDP": "2", "DP_MODE": "vllm", **LOCAL})  # fmt: skip
    specs = plan_engines(config, MODEL, "m", (), inventory=[_node(0), _node(1)])
    assert [(s.name, s.role, s.node_id, s.devices, s.data_parallel) for s in specs] == [
        ("prefill-0", Role.PREFILL, "node-1", (0, 1, 2, 3), VllmDataParallel(2, 2, 0, "10.0.0.2", 29550)),
        ("prefill-1", Role.PREFILL, "node-1", (4, 5, 6, 7), VllmDataParallel(2, 2, 0, "10.0.0.2", 29552)),
        ("decode-0", Role.DECODE, "node-0", tuple(range(8)), VllmDataParallel(2, 2, 0, "10.0.0.1", 29551)),
    ]
    assert [s.tensor_parallel for s in specs] == [2, 2, 4]  # per rank, as vLLM's --tensor-parallel-size


def test_mixed_roles_a_dp1_instance_is_plain_and_a_split_one_gets_a_headless_rest() -> None:
    plan = plan_placement([_node(0, devices=4), _node(1, devices=4)], PlacementRequest(
        Accelerator.CUDA, (InstanceRequest(Role.PREFILL, 1, 1, 1), InstanceRequest(Role.DECODE, 1, 2, 3))))  # fmt: skip
    engines = vllm_dp_engines(plan, cluster_mode=False)
    assert [(e.placement.name, e.placement.node_id, e.placement.devices, e.data_parallel) for e in engines] == [
        ("prefill-0", "node-1", (0,), None),
        ("decode-0", "node-0", (0, 1, 2, 3), VllmDataParallel(3, 2, 0, "10.0.0.1", 29551)),
        ("decode-0-node1", "node-1", (1, 2), VllmDataParallel(3, 1, 2, "10.0.0.1", 29551)),
    ]


def test_rpc_ports_are_per_instance_and_below_the_ephemeral_range() -> None:
    assert [dp_rpc_port(Role.PREFILL, 0), dp_rpc_port(Role.DECODE, 0), dp_rpc_port(Role.COLOCATED, 3)] == [
        29550, 29551, 29556]  # fmt: skip
    with pytest.raises(PlacementError, match="decode-1609 has no DP RPC port"):
        dp_rpc_port(Role.DECODE, 1609)


# --- the door, status and the engine actor ------------------------------------------------


def test_the_door_routes_to_the_head_only() -> None:
    row = {"role": "decode", "host": "127.0.0.2", "state": "healthy"}
    table = RoutingTable([{**row, "name": "decode-0", "port": 8000, "headless": False},
                          {**row, "name": "decode-0-node1", "port": 0, "headless": True}])  # fmt: skip
    assert [engine.name for engine in table.all_engines()] == ["decode-0"]


def _headless_spec(tmp_path: Path) -> EngineSpec:
    return EngineSpec(
        name="decode-0-node1", instance="decode-0", role=Role.DECODE, accelerator=Accelerator.CPU, tensor_parallel=1,
        devices=(0,), model_path="unused", served_model_name="unused", startup_params=(), ds_worker_address="",
        prefix_reuse=False, project_root=str(Path(__file__).resolve().parents[1]), cache_root=str(tmp_path),
        cpu_kvcache_gb=1, data_parallel=VllmDataParallel(2, 1, 1, "127.0.0.1", 29551),
    )  # fmt: skip



def test_a_headless_engine_is_supervised_by_its_process_not_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"headless-{uuid.uuid4().hex}"
    argvs: list[list[str]] = []

    def stand_in(spec: EngineSpec, port: int, events_port: int = 0) -> list[str]:
        argvs.append(build_engine_argv(spec, port))
        return [sys.executable, "-c", "import time; time.sleep(3600)", marker]  # runs; answers nothing

    monkeypatch.setattr(engine_actor, "build_engine_argv", stand_in)
    monkeypatch.setattr(engine_actor, "HEADLESS_SETTLE_S", 0.5)
    supervised = EngineActor(_headless_spec(tmp_path), str(tmp_path), start_timeout_s=30, advertise_host="127.0.0.1")
    try:
        first = supervised.start()
        assert (first["state"], first["port"], first["headless"]) == ("healthy", 0, True)
        assert "--headless" in argvs[0] and "--port" not in argvs[0]
        time.sleep(1.5)  # supervisor rounds: no HTTP probe marks it unhealthy
        assert supervised.info()["state"] == "healthy"

        os.kill(int(first["pid"]), signal.SIGKILL)
        wait_for(lambda: supervised.info()["pid"] != first["pid"] and supervised.info()["state"] == "healthy", 20,
                  "the headless engine restarted")  # fmt: skip
        assert supervised.info()["restarts"] == 1 and len(pids_matching(marker)) == 1
    finally:
        supervised.stop()
        for pid in pids_matching(marker):  # whatever a failing test left behind
            os.kill(pid, signal.SIGKILL)
    assert pids_matching(marker) == []


def test_scaling_adds_and_removes_an_instance_with_its_headless_engine() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-5", "SIMULATED_NODES": "2",
                           "PREFILL_INS_NUM": "2", "DDP": "2", "DP_MODE": "vllm", **LOCAL})  # fmt: skip
    specs = plan_engines(config, MODEL, "m", SIM_WORKERS)
    assert [(s.name, s.node_id, s.devices) for s in specs] == [
        ("prefill-0", "sim-node-0", (0,)), ("prefill-1", "sim-node-0", (1,)), ("decode-0", "sim-node-1", (3, 4))]
    events: list[str] = []
    clock = iter(float(t) for t in range(10_000))
    scaler = Scaler(RecordingControl(events), config, MODEL, "m", SIM_WORKERS, specs, cores=range(6),
                    clock=lambda: next(clock), sleep=lambda s: events.append("wait"))  # fmt: skip

    # One core free on each node: decode-1's two ranks split, its head on sim-node-0.
    out = scaler.scale("decode", 1, ScriptedDoor(events, [{}, {"decode-1": ("healthy", 0)}]))
    added = scaler.specs[3:]
    assert [(s.name, s.node_id, s.devices, s.data_parallel) for s in added] == [
        ("decode-1", "sim-node-0", (2,), VllmDataParallel(2, 1, 0, "127.0.0.2", 29553)),
        ("decode-1-node1", "sim-node-1", (5,), VllmDataParallel(2, 1, 1, "127.0.0.2", 29553)),
    ]
    assert events == ["add decode-1,decode-1-node1", "refresh"]
    assert out.warnings == []  # the door lists the head only, and the Scaler waits for the head only

    events.clear()
    gone = scaler.scale("decode", -1, ScriptedDoor(events, [{"decode-1": ("draining", 0)}, {}]))
    assert [r["name"] for r in gone.removed] == ["decode-1", "decode-1-node1"] and gone.warnings == []
    assert [s.name for s in scaler.specs] == ["prefill-0", "prefill-1", "decode-0"]


# --- refusals and cluster mode ------------------------------------------------------------


def test_dp_mode_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^DP_MODE=ray is invalid: must be one of independent, vllm$"):
        build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "DP_MODE": "ray", **LOCAL})


def test_kv_aware_routing_is_refused_with_vllms_data_parallelism() -> None:
    with pytest.raises(ConfigError) as refused:
        build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-2", "DDP": "2", "DP_MODE": "vllm",
                      "ROUTING_POLICY": "kv_aware", **LOCAL})  # fmt: skip
    assert str(refused.value) == (
        "ROUTING_POLICY=kv_aware is invalid with DP_MODE=vllm and PDP=1 DDP=2: vLLM's own balancer picks the DP "
        "rank, so the door cannot route by the KV a rank holds; set ROUTING_POLICY=prefix_affinity, or "
        "DP_MODE=independent"
    )
    # DP=1 everywhere: nothing to balance inside vLLM, kv_aware stays allowed.
    assert build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "DP_MODE": "vllm",
                         "ROUTING_POLICY": "kv_aware", **LOCAL}).dp_mode == "vllm"  # fmt: skip


def test_routing_defaults_to_kv_aware_except_under_vllms_data_parallelism() -> None:
    cpu = {"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-2", **LOCAL}
    assert build_config(cpu).routing_policy == "kv_aware"
    assert build_config({**cpu, "DDP": "2"}).routing_policy == "kv_aware"  # independent ranks: the door sees each
    assert build_config({**cpu, "DDP": "2", "DP_MODE": "vllm"}).routing_policy == "prefix_affinity"
    assert build_config({**cpu, "DP_MODE": "vllm"}).routing_policy == "kv_aware"  # DP=1: nothing hidden
    assert build_config({**cpu, "DDP": "2", "DP_MODE": "vllm", "ROUTING_POLICY": "round_robin"}).routing_policy == "round_robin"


def test_cluster_mode_refuses_an_instance_the_plan_spreads_over_nodes() -> None:
    config = build_config({"ACCELERATOR": "cuda", "DECODE_INS_NUM": "0", "PTP": "4", "PDP": "4", "DP_MODE": "vllm",
                           **CLUSTER})  # fmt: skip
    with pytest.raises(PlacementError) as refused:
        plan_engines(config, MODEL, "m", (), inventory=[_node(0), _node(1)])
    assert str(refused.value) == (
        "DP_MODE=vllm cannot start colocated-0: the plan spreads its 4 DP ranks over 2 nodes (node-0, node-1), and "
        "in cluster mode the scheduler does not follow the plan's nodes yet, so its headless engines could not find "
        "their head; lower PDP to what one node holds, or set DP_MODE=independent"
    )


def test_cluster_mode_an_instance_on_one_node_is_one_head_meeting_on_its_own_node() -> None:
    config = build_config({"ACCELERATOR": "cuda", "DECODE_INS_NUM": "0", "PTP": "2", "PDP": "4", "DP_MODE": "vllm",
                           **CLUSTER})  # fmt: skip
    for inventory in ([_node(0), _node(1)], None):  # planned on node-0; or no inventory: the scheduler places it
        (head,) = plan_engines(config, MODEL, "m", (), inventory=inventory)
        assert (head.name, head.devices, head.runtime_placed, head.local_ranks) == ("colocated-0", (), True, 4)
        assert head.data_parallel == VllmDataParallel(4, 4, 0, "", 29550)  # the address: where it lands
        with pytest.raises(ValueError, match="the DP address is unresolved"):
            build_engine_argv(head, 8000)
        argv = build_engine_argv(resolve_on_node(head, "10.0.0.7"), 8000)
        assert argv[argv.index("--data-parallel-address") + 1] == "10.0.0.7"
        # Its actor asks the scheduler for the devices of all its ranks: TP2 x 4 local ranks.
        assert engine_invoke_options(config, head).custom_resources == {"GPU/.+/count": 8.0}
