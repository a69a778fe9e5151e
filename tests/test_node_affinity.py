"""Cluster mode applies the plan: an engine actor with a planned node is created with a
required resource affinity on that node's ``HOST_IP`` label (controller/node_affinity.py).
The SDK's own objects are built and read back; openYuanrong's scheduler does not run here,
so what it does with them is not exercised."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yr

from common.config import Accelerator
from controller.controller import engine_invoke_options
from controller.node_affinity import NODE_LABEL, node_affinities, node_label_value
from controller.placement import plan_engines
from controller.planner import inventory_from_resource_view
from deploy.config import build_config
from testkit.helpers import cluster_engine_spec

MODEL = Path("/models/m")
CLUSTER = {"YR_SERVER_ADDRESS": "10.0.0.1:22770"}
LOCAL = {"YR_SESSIONS_DIR": "/nonexistent/yr_sessions"}  # no yr start master info: local mode
AGENT = "function-agent-192.0.2.2-25742"


def _fields(affinities: object) -> list[tuple[object, ...]]:
    """The SDK's Affinity and LabelOperator compare by identity: read their fields."""
    assert isinstance(affinities, list)
    return [
        (a.affinity_kind, a.affinity_type, a.affinity_scope,
         [(op.operator_type, op.key, op.values) for op in a.label_operators])
        for a in affinities
    ]  # fmt: skip


def _required_on(ip: str) -> list[tuple[object, ...]]:
    return [(yr.AffinityKind.RESOURCE, yr.AffinityType.REQUIRED, None, [(yr.OperatorType.LABEL_IN, "HOST_IP", [ip])])]


# --- the pure function: node -> affinity objects --------------------------------------


def test_a_planned_node_becomes_one_required_resource_affinity_on_its_host_ip() -> None:
    affinities = node_affinities(AGENT)
    assert all(isinstance(a, yr.Affinity) for a in affinities)
    assert all(isinstance(op, yr.LabelOperator) for a in affinities for op in a.label_operators)
    assert _fields(affinities) == _required_on("192.0.2.2")
    assert NODE_LABEL == "HOST_IP"


def test_the_planners_address_wins_over_the_ip_in_the_id() -> None:
    assert node_label_value(AGENT, "198.51.100.7") == "198.51.100.7"
    assert _fields(node_affinities(AGENT, "198.51.100.7")) == _required_on("198.51.100.7")
    assert node_label_value("function-agent-10.0.0.12-31000") == "10.0.0.12"  # the port is not read as an address


def test_no_node_means_no_affinity() -> None:
    assert node_affinities("") == []
    assert node_affinities("", "10.0.0.2") == []


def test_a_node_whose_ip_is_not_knowable_gets_no_affinity() -> None:
    assert node_label_value("node-0") == ""
    assert node_affinities("node-0") == []
    assert _fields(node_affinities("node-0", "10.0.0.2")) == _required_on("10.0.0.2")


# --- engine_invoke_options: cluster mode with a node pins, everything else is unchanged ----


def test_cluster_mode_engine_with_a_node_is_pinned_and_keeps_its_resources() -> None:
    config = build_config({"ACCELERATOR": "cuda", **CLUSTER})
    options = engine_invoke_options(config, cluster_engine_spec(node_id=AGENT))
    assert _fields(options.schedule_affinities) == _required_on("192.0.2.2")
    assert (options.cpu, options.custom_resources) == (1000, {"GPU/.+/count": 2.0})
    # the priority switches stay the SDK's defaults: one required affinity needs no order
    assert (options.required_priority, options.preferred_priority, options.preferred_anti_other_labels) == (
        False, True, False)  # fmt: skip
    options.check_options_valid()  # the SDK's own type check accepts the options


def test_cluster_mode_engine_without_a_node_is_left_to_the_scheduler() -> None:
    config = build_config({"ACCELERATOR": "cuda", **CLUSTER})
    options = engine_invoke_options(config, cluster_engine_spec(node_id=""))
    assert options.schedule_affinities == yr.InvokeOptions().schedule_affinities  # the SDK's default, untouched
    assert not options.schedule_affinities
    assert options.custom_resources == {"GPU/.+/count": 2.0}


def test_cluster_mode_engine_on_a_node_without_an_ip_is_left_to_the_scheduler_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = build_config({"ACCELERATOR": "cuda", **CLUSTER})
    with caplog.at_level(logging.WARNING, logger="controller.controller"):
        options = engine_invoke_options(config, cluster_engine_spec(node_id="node-0"))
    assert not options.schedule_affinities
    assert caplog.messages == ["[engine=decode-0] not pinned to planned node node-0: its id holds no IP for the "
                               "HOST_IP label; the scheduler places it by its resources"]  # fmt: skip


def test_local_mode_never_pins_even_with_a_node() -> None:
    config = build_config({"ACCELERATOR": "cpu", "CPU_CORES_PER_RANK": "1", **LOCAL})
    assert not config.cluster_mode
    options = engine_invoke_options(config, cluster_engine_spec(accelerator=Accelerator.CPU, devices=(0, 1), node_id="node-0"))
    assert not options.schedule_affinities
    assert options.cpu == 2000


# --- from openYuanrong's resource view to the options each engine actor is created with ---


def test_each_planned_engine_is_pinned_to_the_node_the_planner_chose_from_the_resource_view() -> None:
    view = [
        {"id": "function-agent-192.0.2.2-25742", "status": 0,
         "capacity": {"CPU": 16000.0, "Memory": 262144.0, "GPU/H200/count": 8.0},
         "allocatable": {"CPU": 16000.0, "Memory": 262144.0, "GPU/H200/count": 4.0}},
        {"id": "function-agent-192.0.2.3-25742", "status": 0,
         "capacity": {"CPU": 16000.0, "Memory": 262144.0, "GPU/H200/count": 8.0},
         "allocatable": {"CPU": 16000.0, "Memory": 262144.0, "GPU/H200/count": 8.0}},
    ]  # fmt: skip
    config = build_config({"ACCELERATOR": "cuda", "PTP": "4", "DTP": "8", **CLUSTER})
    specs = plan_engines(config, MODEL, "m", (), inventory=inventory_from_resource_view(view, 31501))
    # TP8 decode fits only the whole node .3; TP4 prefill goes to the tightest node that holds it, .2
    assert [(s.name, s.node_id) for s in specs] == [
        ("prefill-0", "function-agent-192.0.2.2-25742"), ("decode-0", "function-agent-192.0.2.3-25742")]  # fmt: skip
    prefill, decode = (engine_invoke_options(config, s) for s in specs)
    assert _fields(prefill.schedule_affinities) == _required_on("192.0.2.2")
    assert _fields(decode.schedule_affinities) == _required_on("192.0.2.3")
    assert (prefill.custom_resources, decode.custom_resources) == ({"GPU/.+/count": 4.0}, {"GPU/.+/count": 8.0})
