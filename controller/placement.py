"""Placement: which engines to start, on which node and devices (pure functions but for
the defaults the callers may leave out).

The planner (controller/planner.py) decides; this module turns a ServiceConfig into the
planner's request and inventory, and the planner's answer into one EngineSpec per engine.

- Local mode: the inventory is this machine as one node (address 127.0.0.1, where local
  engines listen; its devices are VISIBLE_DEVICES or those detected; on CPU, the cores),
  and the engines attach to the local data system workers in turn.
- Cluster mode: openYuanrong's scheduler places each engine actor with the devices its
  resource request names, and the runtime makes them visible to it, so the specs carry no
  devices (``runtime_placed``). Each engine attaches to the data system worker on the node
  it lands on (``:<DS_WORKER_PORT>``, completed with the node's address by the engine
  actor). Given the cluster's inventory (``yr.resources()``), the planner checks first that
  the request fits, and names the node it would choose.
- ``DP_MODE=vllm``: the ranks of an instance on one node are one engine, a head or a
  headless one (controller/dp_groups.py); refusals come with the plan, before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import YUANRONG_CONNECTOR, Accelerator, Role, ServiceConfig, simulated_node_address
from controller.dp_groups import DPEngine, independent_engines, vllm_dp_engines
from controller.planner import EnginePlacement, InstanceRequest, Node, PlacementRequest, plan_placement
from workers.engine_process import EngineSpec

LOCAL_NODE_ID = "local"
SIMULATED_NODE_PREFIX = "sim-node-"
LOCAL_NODE_ADDRESS = "127.0.0.1"  # local engines bind and are reached there
ENGINE_MEMORY_MB = 4096  # what each engine actor asks the scheduler for


@dataclass(frozen=True)
class InstancePlan:
    role: Role
    count: int
    tensor_parallel: int
    data_parallel: int
    startup_params: tuple[str, ...]


def instance_plans(config: ServiceConfig) -> list[InstancePlan]:
    if config.adaptive_roles:  # one kind of engine (TP, DP and startup parameters: the prefill's)
        engines = config.prefill_instances + config.decode_instances
        return [InstancePlan(Role.ADAPTIVE, engines, config.prefill_tp, config.prefill_dp, config.prefill_startup_params)]
    if not config.disaggregated:
        return [
            InstancePlan(Role.COLOCATED, config.prefill_instances, config.prefill_tp, config.prefill_dp, config.prefill_startup_params)
        ]
    return [
        InstancePlan(Role.PREFILL, config.prefill_instances, config.prefill_tp, config.prefill_dp, config.prefill_startup_params),
        InstancePlan(Role.DECODE, config.decode_instances, config.decode_tp, config.decode_dp, config.decode_startup_params),
    ]


def placement_request(config: ServiceConfig) -> PlacementRequest:
    return PlacementRequest(
        accelerator=config.accelerator,
        instances=tuple(
            InstanceRequest(p.role, p.count, p.tensor_parallel, p.data_parallel) for p in instance_plans(config)
        ),
        cores_per_rank=config.cpu_cores_per_rank,
        memory_mb_per_engine=ENGINE_MEMORY_MB if config.cluster_mode else 0,  # local mode: resources are not reserved
    )


def local_inventory(config: ServiceConfig, cores: Sequence[int], ds_worker_addresses: Sequence[str]) -> list[Node]:
    """This machine as one node, or as SIMULATED_NODES nodes. ``cores``: the caller's CPU
    affinity. On CPU the engines' cores are the configured devices (VISIBLE_DEVICES,
    default that same affinity)."""
    if config.simulated_nodes:
        return simulated_inventory(config, ds_worker_addresses)
    cpu = config.accelerator is Accelerator.CPU
    return [Node(
        node_id=LOCAL_NODE_ID, address=LOCAL_NODE_ADDRESS, accelerator=config.accelerator,
        devices=() if cpu else config.devices, cores=config.devices if cpu else tuple(cores),
        ds_worker_addresses=tuple(ds_worker_addresses),
    )]  # fmt: skip


def simulated_inventory(config: ServiceConfig, ds_worker_addresses: Sequence[str]) -> list[Node]:
    """SIMULATED_NODES nodes on this machine: node i at its own loopback address with the
    i-th data system worker and the i-th contiguous share of the visible devices (CPU:
    cores; the first nodes get one more when they do not divide evenly)."""
    count = config.simulated_nodes
    if len(ds_worker_addresses) != count:
        raise ValueError(f"{count} simulated nodes need {count} data system workers, got {len(ds_worker_addresses)}")
    cpu = config.accelerator is Accelerator.CPU
    share, extra = divmod(len(config.devices), count)
    nodes: list[Node] = []
    start = 0
    for index in range(count):
        end = start + share + (1 if index < extra else 0)
        units = config.devices[start:end]
        start = end
        nodes.append(Node(
            node_id=f"{SIMULATED_NODE_PREFIX}{index}", address=simulated_node_address(index),
            accelerator=config.accelerator, devices=() if cpu else units, cores=units if cpu else (),
            ds_worker_addresses=(ds_worker_addresses[index],),
        ))  # fmt: skip
    return nodes


def place_engines(
    config: ServiceConfig,
    ds_worker_addresses: Sequence[str],
    inventory: Sequence[Node] | None = None,
    cores: Sequence[int] | None = None,
) -> list[EnginePlacement] | None:
    """The planner's plan (raises PlacementError, one line, when it cannot be placed, or
    when DP_MODE=vllm cannot start it), or None in cluster mode without an inventory: the
    scheduler places the engines alone."""
    if inventory is None:
        if config.cluster_mode:
            return None
        inventory = local_inventory(config, tuple(sorted(os.sched_getaffinity(0))) if cores is None else cores,
                                    ds_worker_addresses)  # fmt: skip
    plan = plan_placement(inventory, placement_request(config))
    engines_to_start(config, plan)  # DP_MODE=vllm's refusals, before anything starts
    return plan


def engines_to_start(config: ServiceConfig, placements: Sequence[EnginePlacement]) -> list[DPEngine]:
    """The plan's ranks as engines: one each (DP_MODE=independent), or one per node of an
    instance (DP_MODE=vllm)."""
    if config.dp_mode == "vllm":
        return vllm_dp_engines(placements, config.cluster_mode)
    return independent_engines(placements)


def engine_specs(
    config: ServiceConfig,
    placements: Sequence[EnginePlacement] | None,
    model_path: Path,
    served_model_name: str,
) -> list[EngineSpec]:
    """One spec per engine, from the plan (``None``: cluster mode, the scheduler places)."""
    startup = {p.role: p.startup_params for p in instance_plans(config)}
    specs: list[EngineSpec] = []
    for engine in engines_to_start(config, placements if placements is not None else _unplanned(config)):
        placement = engine.placement
        specs.append(
            EngineSpec(
                name=placement.name,
                instance=placement.instance,
                role=placement.role,
                accelerator=config.accelerator,
                tensor_parallel=placement.tensor_parallel,
                # Cluster mode: the devices are the ones the runtime made visible to the actor.
                devices=() if config.cluster_mode else placement.devices,
                model_path=str(model_path),
                served_model_name=served_model_name,
                startup_params=startup[placement.role],
                ds_worker_address=f":{config.datasystem.node_worker_port}" if config.cluster_mode
                else placement.ds_worker_address,
                prefix_reuse=config.using_prefix_connector,
                connector=config.connector.kind,
                connector_options=connector_options(config),
                project_root=str(Path(__file__).resolve().parents[1]),
                cache_root=str(config.model_cache_dir.parent / "vllm"),
                cpu_kvcache_gb=config.cpu_kvcache_gb,
                bind_host="" if config.cluster_mode else placement.node_address,  # "": its node's address
                node_id=placement.node_id,
                runtime_placed=config.cluster_mode,
                kv_events=config.kv_events,
                data_parallel=engine.data_parallel,
                api_key=config.api_key,
                metrics_public=config.metrics_public,
                sim_profile=config.sim_profile,
            )
        )
    return specs


def connector_options(config: ServiceConfig) -> dict[str, object]:
    """kv_connector_extra_config for every engine. With prefix reuse and prefill and decode
    of different TP sizes, ours also gets ``peer_tp_sizes``: both sizes (each engine leaves
    its own out), so an engine reuses prefixes the other role stored (resharded on load)."""
    options = config.connector.extra_config()
    if config.adaptive_roles and config.connector.kind == YUANRONG_CONNECTOR:
        options["handoff_saves"] = True  # any engine may take a prefill leg: it saves that prompt for the decode leg
    sizes = sorted({plan.tensor_parallel for plan in instance_plans(config)})
    if config.connector.kind == YUANRONG_CONNECTOR and config.using_prefix_connector and len(sizes) > 1:
        options["peer_tp_sizes"] = sizes
    return options


def _unplanned(config: ServiceConfig) -> list[EnginePlacement]:
    """Cluster mode without an inventory: the engines, with no node chosen."""
    return [
        EnginePlacement(
            name=f"{p.role.value}-{index}" if p.data_parallel == 1 else f"{p.role.value}-{index}-dp{rank}",
            instance=f"{p.role.value}-{index}", role=p.role, tensor_parallel=p.tensor_parallel, dp_rank=rank,
            dp_size=p.data_parallel, dp_local_rank=rank, dp_master_address="", node_id="", node_address="",
            devices=(), ds_worker_address="",
        )  # fmt: skip
        for p in instance_plans(config)
        for index in range(p.count)
        for rank in range(p.data_parallel)
    ]


def plan_engines(
    config: ServiceConfig,
    model_path: Path,
    served_model_name: str,
    ds_worker_addresses: tuple[str, ...],
    inventory: Sequence[Node] | None = None,
    cores: Sequence[int] | None = None,
) -> list[EngineSpec]:
    """One spec per engine (DP ranks of an instance are separate engines, or, with
    DP_MODE=vllm, one per node): the plan and the specs in one call."""
    placements = place_engines(config, ds_worker_addresses, inventory, cores)
    return engine_specs(config, placements, model_path, served_model_name)
