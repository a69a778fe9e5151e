"""The placement planner on synthetic clusters (pure: no machine, no runtime).

Plans are asserted whole: engine -> (node, devices) for every engine, and refusals by
their exact one-line message."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Accelerator, Role
from common.errors import ConfigError
from controller.placement import plan_engines
from controller.planner import (
    EnginePlacement,
    InstanceRequest,
    Node,
    PlacementError,
    PlacementRequest,
    format_plan,
    inventory_from_resource_view,
    plan_placement,
)
from deploy.config import build_config
from workers.engine_process import build_engine_env

CUDA, CPU, ASCEND = Accelerator.CUDA, Accelerator.CPU, Accelerator.ASCEND
P, D, C = Role.PREFILL, Role.DECODE, Role.COLOCATED
MODEL = Path("/models/m")
NO_CLUSTER = {"YR_SESSIONS_DIR": "/nonexistent/yr_sessions"}  # no yr start master info: local mode


def _node(index: int, devices: tuple[int, ...] = tuple(range(8)), capacity: int = 0, cores: int = 32,
          accelerator: Accelerator = CUDA, memory_mb: int = 0) -> Node:  # fmt: skip
    address = f"10.0.{index // 250}.{index % 250 + 1}"
    return Node(f"node-{index}", address, accelerator, devices, tuple(range(cores)), memory_mb=memory_mb,
                device_capacity=capacity, ds_worker_addresses=(f"{address}:31501",))  # fmt: skip


def _cluster(count: int, devices: int = 8) -> list[Node]:
    return [_node(i, tuple(range(devices))) for i in range(count)]


def _request(*instances: tuple[Role, int, int, int], accelerator: Accelerator = CUDA, **options: object) -> PlacementRequest:
    return PlacementRequest(accelerator, tuple(InstanceRequest(*spec) for spec in instances), **options)  # type: ignore[arg-type]


def _layout(plan: list[EnginePlacement]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(p.name, p.node_id, p.devices) for p in plan]


def _refusal(nodes: list[Node], request: PlacementRequest) -> str:
    with pytest.raises(PlacementError) as raised:
        plan_placement(nodes, request)
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- 1 node ------------------------------------------------------------------------------


def test_one_node_hands_out_devices_in_instance_order() -> None:
    plan = plan_placement([_node(0)], _request((P, 1, 1, 1), (D, 1, 2, 2)))
    assert _layout(plan) == [
        ("prefill-0", "node-0", (0,)),
        ("decode-0-dp0", "node-0", (1, 2)),
        ("decode-0-dp1", "node-0", (3, 4)),
    ]
    assert {p.ds_worker_address for p in plan} == {"10.0.0.1:31501"}


# --- 2 nodes (the worked example in docs/placement.md) -----------------------------------------------


def test_two_nodes_of_eight_tp_stays_inside_a_node_and_dp_ranks_pack() -> None:
    plan = plan_placement(_cluster(2), _request((P, 2, 2, 2), (D, 1, 4, 2)))
    assert format_plan(plan) == [
        "ENGINE         NODE    ADDRESS   DEVICES  DP   DS WORKER",
        "prefill-0-dp0  node-1  10.0.0.2  0,1      0/2  10.0.0.2:31501",
        "prefill-0-dp1  node-1  10.0.0.2  2,3      1/2  10.0.0.2:31501",
        "prefill-1-dp0  node-1  10.0.0.2  4,5      0/2  10.0.0.2:31501",
        "prefill-1-dp1  node-1  10.0.0.2  6,7      1/2  10.0.0.2:31501",
        "decode-0-dp0   node-0  10.0.0.1  0,1,2,3  0/2  10.0.0.1:31501",
        "decode-0-dp1   node-0  10.0.0.1  4,5,6,7  1/2  10.0.0.1:31501",
    ]
    assert [(p.dp_rank, p.dp_local_rank, p.dp_master_address) for p in plan[4:]] == [(0, 0, "10.0.0.1"), (1, 1, "10.0.0.1")]


def test_two_nodes_one_prefill_one_decode_share_the_tightest_node() -> None:
    plan = plan_placement(_cluster(2), _request((P, 1, 4, 1), (D, 1, 4, 1)))
    assert _layout(plan) == [("prefill-0", "node-0", (0, 1, 2, 3)), ("decode-0", "node-0", (4, 5, 6, 7))]


def test_two_nodes_tp_larger_than_any_node_is_refused() -> None:
    assert _refusal(_cluster(2), _request((P, 1, 16, 1), (D, 1, 4, 1))) == (
        "PTP=16 is invalid: one engine needs 16 cuda devices on one node (TP never spans nodes), "
        "but the largest node (node-0) has 8; lower PTP to at most 8"
    )


def test_two_nodes_not_enough_devices_in_total_is_refused() -> None:
    assert _refusal(_cluster(2), _request((P, 3, 4, 1), (D, 2, 4, 1))) == (
        "PREFILL_INS_NUM=3 x PTP=4 x PDP=1 + DECODE_INS_NUM=2 x DTP=4 x DDP=1 needs 20 cuda devices, "
        "but the 2 node(s) have 16 free (node-0 8, node-1 8); lower the counts or add nodes"
    )


# --- 8 nodes ------------------------------------------------------------------------------


def test_eight_nodes_node_sized_instances_take_whole_nodes() -> None:
    plan = plan_placement(_cluster(8), _request((P, 4, 4, 2), (D, 2, 2, 4)))
    assert _layout(plan) == [
        ("prefill-0-dp0", "node-0", (0, 1, 2, 3)), ("prefill-0-dp1", "node-0", (4, 5, 6, 7)),
        ("prefill-1-dp0", "node-1", (0, 1, 2, 3)), ("prefill-1-dp1", "node-1", (4, 5, 6, 7)),
        ("prefill-2-dp0", "node-2", (0, 1, 2, 3)), ("prefill-2-dp1", "node-2", (4, 5, 6, 7)),
        ("prefill-3-dp0", "node-3", (0, 1, 2, 3)), ("prefill-3-dp1", "node-3", (4, 5, 6, 7)),
        ("decode-0-dp0", "node-4", (0, 1)), ("decode-0-dp1", "node-4", (2, 3)),
        ("decode-0-dp2", "node-4", (4, 5)), ("decode-0-dp3", "node-4", (6, 7)),
        ("decode-1-dp0", "node-5", (0, 1)), ("decode-1-dp1", "node-5", (2, 3)),
        ("decode-1-dp2", "node-5", (4, 5)), ("decode-1-dp3", "node-5", (6, 7)),
    ]  # fmt: skip


def test_eight_nodes_dp_larger_than_a_node_is_packed_into_node_sized_groups() -> None:
    plan = plan_placement(_cluster(8), _request((C, 1, 2, 10)))
    assert [(p.name, p.node_id, p.devices, p.dp_local_rank) for p in plan] == [
        ("colocated-0-dp0", "node-0", (0, 1), 0), ("colocated-0-dp1", "node-0", (2, 3), 1),
        ("colocated-0-dp2", "node-0", (4, 5), 2), ("colocated-0-dp3", "node-0", (6, 7), 3),
        ("colocated-0-dp4", "node-1", (0, 1), 0), ("colocated-0-dp5", "node-1", (2, 3), 1),
        ("colocated-0-dp6", "node-1", (4, 5), 2), ("colocated-0-dp7", "node-1", (6, 7), 3),
        ("colocated-0-dp8", "node-2", (0, 1), 0), ("colocated-0-dp9", "node-2", (2, 3), 1),
    ]  # fmt: skip
    assert {p.dp_master_address for p in plan} == {"10.0.0.1"}
    assert [p.ds_worker_address for p in plan] == ["10.0.0.1:31501"] * 4 + ["10.0.0.2:31501"] * 4 + ["10.0.0.3:31501"] * 2


def test_eight_nodes_the_rest_of_an_instance_goes_to_the_tightest_node_that_holds_it() -> None:
    nodes = [_node(i, tuple(range(free))) for i, free in enumerate((8, 8, 8, 8, 8, 8, 6, 4))]
    plan = plan_placement(nodes, _request((P, 1, 2, 6)))  # 4 ranks on a full node, the other 2 on node-7 (4 free)
    assert _layout(plan) == [
        ("prefill-0-dp0", "node-0", (0, 1)), ("prefill-0-dp1", "node-0", (2, 3)),
        ("prefill-0-dp2", "node-0", (4, 5)), ("prefill-0-dp3", "node-0", (6, 7)),
        ("prefill-0-dp4", "node-7", (0, 1)), ("prefill-0-dp5", "node-7", (2, 3)),
    ]  # fmt: skip


# --- 64 nodes -----------------------------------------------------------------------------


def test_sixty_four_nodes_fill_exactly() -> None:
    plan = plan_placement(_cluster(64), _request((P, 32, 8, 1), (D, 64, 4, 1)))
    expected = [(f"prefill-{i}", f"node-{i}", tuple(range(8))) for i in range(32)]
    expected += [(f"decode-{i}", f"node-{32 + i // 2}", (0, 1, 2, 3) if i % 2 == 0 else (4, 5, 6, 7)) for i in range(64)]
    assert _layout(plan) == expected
    assert plan[-1].node_address == "10.0.0.64" and plan[-1].ds_worker_address == "10.0.0.64:31501"


def test_sixty_four_nodes_one_device_too_many_is_refused_listing_eight_nodes() -> None:
    message = _refusal(_cluster(64), _request((P, 32, 8, 1), (D, 129, 2, 1)))
    assert message == (
        "PREFILL_INS_NUM=32 x PTP=8 x PDP=1 + DECODE_INS_NUM=129 x DTP=2 x DDP=1 needs 514 cuda devices, but the "
        "64 node(s) have 512 free (node-0 8, node-1 8, node-2 8, node-3 8, node-4 8, node-5 8, node-6 8, node-7 8, "
        "and 56 more); lower the counts or add nodes"
    )


# --- mixed device counts, fragmented free devices -----------------------------------------


def test_mixed_node_sizes_big_engines_first_then_best_fit() -> None:
    nodes = [_node(0, tuple(range(8))), _node(1, tuple(range(4))), _node(2, tuple(range(2)))]
    plan = plan_placement(nodes, _request((P, 2, 4, 1), (D, 3, 2, 1)))
    assert _layout(plan) == [
        ("prefill-0", "node-1", (0, 1, 2, 3)),
        ("prefill-1", "node-0", (0, 1, 2, 3)),
        ("decode-0", "node-2", (0, 1)),
        ("decode-1", "node-0", (4, 5)),
        ("decode-2", "node-0", (6, 7)),
    ]


def test_mixed_sizes_a_small_first_instance_does_not_take_the_big_node() -> None:
    # In order (prefill first, first fit) the prefill would take node-0 and leave the TP4 decode no node.
    plan = plan_placement([_node(0, tuple(range(4))), _node(1, tuple(range(2)))], _request((P, 1, 2, 1), (D, 1, 4, 1)))
    assert _layout(plan) == [("prefill-0", "node-1", (0, 1)), ("decode-0", "node-0", (0, 1, 2, 3))]


def test_fragmented_free_devices_are_used_as_they_are() -> None:
    nodes = [_node(0, (3, 6), capacity=8), _node(1, (0, 5), capacity=8)]
    plan = plan_placement(nodes, _request((P, 1, 2, 1), (D, 1, 2, 1)))
    assert _layout(plan) == [("prefill-0", "node-0", (3, 6)), ("decode-0", "node-1", (0, 5))]


def test_fragmented_free_devices_that_hold_no_tp_group_are_refused() -> None:
    nodes = [_node(i, (2 * i, 2 * i + 1), capacity=8) for i in range(4)]  # 8 free, 2 per node
    assert _refusal(nodes, _request((P, 1, 4, 1), (D, 1, 2, 1))) == (
        "PTP=4 cannot be placed: engine prefill-0 needs 4 cuda devices on one node (TP never spans nodes), but the "
        "free cuda devices are fragmented, at most 2 on any node (free: node-0 2, node-1 2, node-2 2, node-3 2); "
        "free whole nodes, or lower PTP"
    )


def test_fragmentation_left_by_earlier_engines_is_refused() -> None:
    nodes = [_node(0, tuple(range(6))), _node(1, (0, 1))]  # 8 free; after decode-0-dp0 takes 4 of node-0: 2 and 2
    assert _refusal(nodes, _request((D, 1, 4, 2))) == (
        "DTP=4 cannot be placed: engine decode-0-dp1 needs 4 cuda devices on one node (TP never spans nodes), but "
        "the free cuda devices are fragmented, at most 2 on any node after placing the engines before it "
        "(free: node-0 2, node-1 2); free whole nodes, or lower DTP"
    )


def test_nodes_without_the_accelerator_are_skipped_and_none_is_refused() -> None:
    nodes = [_node(0, (), cores=16, accelerator=CPU), _node(1, tuple(range(4)))]
    assert _layout(plan_placement(nodes, _request((P, 1, 2, 1), (D, 1, 2, 1)))) == [
        ("prefill-0", "node-1", (0, 1)), ("decode-0", "node-1", (2, 3))]  # fmt: skip
    assert _refusal(nodes, _request((P, 1, 1, 1), accelerator=ASCEND)) == (
        "ACCELERATOR=ascend is invalid for these nodes: none has free ascend devices (node-0 0, node-1 4); "
        "choose the accelerator the nodes have"
    )


def test_empty_inventory_and_duplicate_ids_are_refused() -> None:
    assert _refusal([], _request((P, 1, 1, 1))) == (
        "the node inventory is empty: no node to place engines on; start openYuanrong agents (yr start) "
        "or deploy in local mode"
    )
    assert _refusal([_node(0), _node(0)], _request((P, 1, 1, 1))) == (
        "node id node-0 appears twice in the inventory; node ids must be unique"
    )


def test_visible_devices_restrict_every_node() -> None:
    plan = plan_placement(_cluster(2), _request((P, 1, 2, 1), (D, 1, 2, 1), visible_devices=(1, 3, 5)))
    assert _layout(plan) == [("prefill-0", "node-0", (1, 3)), ("decode-0", "node-1", (1, 3))]


def test_memory_is_checked_where_known() -> None:
    nodes = [_node(0, memory_mb=8192), _node(1, memory_mb=4096)]
    plan = plan_placement(nodes, _request((P, 2, 1, 1), (D, 1, 1, 1), memory_mb_per_engine=4096))
    # node-0's memory holds two engines, so the third goes to node-1 although node-0 has devices left.
    assert _layout(plan) == [("prefill-0", "node-0", (0,)), ("prefill-1", "node-0", (1,)), ("decode-0", "node-1", (0,))]
    assert _refusal(nodes, _request((P, 2, 1, 2), memory_mb_per_engine=4096)) == (
        "4 engines need 16384 MB of memory (4096 MB each), but the nodes have 12288 MB free; "
        "lower the counts or add nodes"
    )


# --- colocated mode, CPU cores -----------------------------------------------------------


def test_colocated_instances_across_two_nodes_attach_to_their_nodes_workers() -> None:
    config = build_config({"ACCELERATOR": "cuda", "VISIBLE_DEVICES": "0-15", "DECODE_INS_NUM": "0",
                           "PREFILL_INS_NUM": "3", "PTP": "4", **NO_CLUSTER})  # fmt: skip
    specs = plan_engines(config, MODEL, "m", (), inventory=_cluster(2))
    assert [(s.name, s.role, s.node_id, s.devices, s.ds_worker_address) for s in specs] == [
        ("colocated-0", C, "node-0", (0, 1, 2, 3), "10.0.0.1:31501"),
        ("colocated-1", C, "node-0", (4, 5, 6, 7), "10.0.0.1:31501"),
        ("colocated-2", C, "node-1", (0, 1, 2, 3), "10.0.0.2:31501"),
    ]
    assert build_engine_env(specs[2], {})["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_cpu_cores_are_split_between_engines_and_their_tp_ranks() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-7", "PTP": "2", "DDP": "2",
                           "CPU_CORES_PER_RANK": "2", **NO_CLUSTER})  # fmt: skip
    specs = plan_engines(config, MODEL, "m", ("127.0.0.1:31501",), cores=(0, 1))
    assert [(s.name, s.node_id, s.devices) for s in specs] == [
        ("prefill-0", "local", (0, 1, 2, 3)),
        ("decode-0-dp0", "local", (4, 5)),
        ("decode-0-dp1", "local", (6, 7)),
    ]
    assert [build_engine_env(s, {})["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0,1|2,3", "4,5", "6,7"]


def test_cpu_nodes_give_cores_and_refuse_a_tp_group_larger_than_a_node() -> None:
    nodes = [_node(i, (), cores=8, accelerator=CPU) for i in range(2)]
    plan = plan_placement(nodes, _request((P, 1, 2, 1), (D, 2, 1, 1), accelerator=CPU, cores_per_rank=3))
    assert _layout(plan) == [
        ("prefill-0", "node-0", (0, 1, 2, 3, 4, 5)),
        ("decode-0", "node-1", (0, 1, 2)),
        ("decode-1", "node-1", (3, 4, 5)),
    ]
    assert _refusal(nodes, _request((P, 1, 4, 1), accelerator=CPU, cores_per_rank=4)) == (
        "PTP=4 x CPU_CORES_PER_RANK=4 is invalid: one engine needs 16 cpu cores on one node (TP never spans nodes), "
        "but the largest node (node-0) has 8; lower PTP to at most 2"
    )


def test_cpu_cores_per_rank_counts_in_the_local_device_check() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-3", "CPU_CORES_PER_RANK": "4", **NO_CLUSTER})
    assert str(raised.value) == (
        "PREFILL_INS_NUM=1 x PTP=1 x PDP=1 + DECODE_INS_NUM=1 x DTP=1 x DDP=1 x CPU_CORES_PER_RANK=4 needs 8 cpu "
        "devices, but only 4 are visible (0,1,2,3); lower the counts or set VISIBLE_DEVICES"
    )


# --- cluster mode: the inventory from openYuanrong's resource view -------------------------


def test_resource_view_becomes_an_inventory() -> None:
    view = [
        {"id": "function-agent-192.0.2.2-25742", "status": 0,
         "capacity": {"CPU": 16000.0, "Memory": 65536.0, "NPU/910B4/count": 8.0},
         "allocatable": {"CPU": 12000.0, "Memory": 49152.0, "NPU/910B4/count": 6.0}},
        {"id": "function-agent-192.0.2.3-25742", "status": 0,
         "capacity": {"CPU": 8000.0, "Memory": 32768.0}, "allocatable": {"CPU": 8000.0, "Memory": 32768.0}},
        {"id": "function-agent-192.0.2.4-25742", "status": 1,  # not ready: left out
         "capacity": {"CPU": 8000.0, "NPU/910B4/count": 8.0}, "allocatable": {"CPU": 8000.0, "NPU/910B4/count": 8.0}},
    ]  # fmt: skip
    nodes = inventory_from_resource_view(view, ds_worker_port=31501)
    assert nodes == [
        Node("function-agent-192.0.2.2-25742", "192.0.2.2", ASCEND, (0, 1, 2, 3, 4, 5), tuple(range(12)),
             memory_mb=49152, device_capacity=8, ds_worker_addresses=("192.0.2.2:31501",)),
        Node("function-agent-192.0.2.3-25742", "192.0.2.3", CPU, (), tuple(range(8)),
             memory_mb=32768, device_capacity=0, ds_worker_addresses=("192.0.2.3:31501",)),
    ]  # fmt: skip
    plan = plan_placement(nodes, _request((P, 1, 4, 1), (D, 1, 2, 1), accelerator=ASCEND, memory_mb_per_engine=4096))
    assert [(p.name, p.node_address, p.ds_worker_address) for p in plan] == [
        ("prefill-0", "192.0.2.2", "192.0.2.2:31501"), ("decode-0", "192.0.2.2", "192.0.2.2:31501")]  # fmt: skip
    with pytest.raises(PlacementError, match="node id agent-x in openYuanrong's resource view has no IPv4 address"):
        inventory_from_resource_view([{"id": "agent-x", "status": 0, "capacity": {}, "allocatable": {}}], 31501)


def test_cluster_mode_with_an_inventory_names_nodes_but_leaves_devices_to_the_runtime() -> None:
    config = build_config({"ACCELERATOR": "cuda", "YR_SERVER_ADDRESS": "10.0.0.1:22770", "PTP": "8", "DTP": "8"})
    specs = plan_engines(config, MODEL, "m", (), inventory=_cluster(2))
    assert [(s.name, s.node_id, s.devices, s.runtime_placed, s.ds_worker_address) for s in specs] == [
        ("prefill-0", "node-0", (), True, ":31501"), ("decode-0", "node-1", (), True, ":31501")]  # fmt: skip
    with pytest.raises(PlacementError, match="PTP=8 is invalid: one engine needs 8 cuda devices on one node"):
        plan_engines(config, MODEL, "m", (), inventory=_cluster(2, devices=4))
