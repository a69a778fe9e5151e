"""What a scale operation changes, as pure functions: which role a word names, the names
of new instances, where they run, and which instances a scale-in removes.

- Roles: a PD deployment scales ``prefill`` and ``decode``; a colocated one
  (``DECODE_INS_NUM=0``) scales ``colocated``, and accepts ``prefill`` for it too (its
  instances are counted by ``PREFILL_INS_NUM``). Any other word is refused in one line.
- Names: a new instance of a role takes the next free index (``decode-1`` after
  ``decode-0``; DP ranks as at deploy time: ``decode-1-dp0``, ``decode-1-dp1``). Indices are
  never reused while a higher one runs, so a name always means one engine's life.
- Local placement: the planner (controller/planner.py) on this machine's devices minus
  those the running engines use; data system workers least used first. On CPU, when too
  few cores are free, the new engines share the least-used cores (a warning says which):
  CPU engines can share cores, slower. Accelerator devices are never shared: too few free
  ones is a refusal.
- Cluster mode: the scheduler places the new engine actors (no node, no devices chosen
  here), as at deploy time without an inventory.
- Adoption (the keeper restarting a killed deploy process): the engines as scale
  operations left them, from state.json (``adopted_specs``).
- Scale-in removes the instances of the role with the highest indices, and never the last
  instance of a role: the door tells a PD deployment from a colocated one by the roles
  present (door/routing.py ``disaggregated``), so a PD deployment with no prefill
  or no decode engine left would route every request to no engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import Accelerator, Role, ServiceConfig
from common.errors import ConfigError
from controller.placement import InstancePlan, engine_specs, instance_plans, local_inventory
from controller.planner import EnginePlacement, InstanceRequest, PlacementError, PlacementRequest, plan_placement
from workers.engine_process import EngineSpec

_SETTINGS = {Role.PREFILL: ("PTP", "PDP"), Role.DECODE: ("DTP", "DDP"), Role.COLOCATED: ("PTP", "PDP"),
             Role.ADAPTIVE: ("PTP", "PDP")}


@dataclass(frozen=True)
class MorePlacements:
    placements: list[EnginePlacement]
    shared_cores: tuple[int, ...] = ()  # CPU: cores the new engines share with running ones (a warning)


def resolve_role(word: str, disaggregated: bool, adaptive: bool = False) -> Role:
    """The role ``word`` names in this deployment, or ConfigError saying what is allowed."""
    if adaptive:
        if word == "adaptive":
            return Role.ADAPTIVE
        raise ConfigError(f"role {word!r} is invalid: this deployment's engines change roles (ROLES=adaptive); "
                          "scale adaptive")  # fmt: skip
    if disaggregated and word in ("prefill", "decode"):
        return Role(word)
    if not disaggregated and word in ("colocated", "prefill"):
        return Role.COLOCATED
    if disaggregated:
        raise ConfigError(f"role {word!r} is invalid: this PD-disaggregated deployment scales prefill or decode")
    raise ConfigError(f"role {word!r} is invalid: this PD-colocated deployment (DECODE_INS_NUM=0) scales colocated "
                      "(or prefill, the same instances)")  # fmt: skip


def instance_index(instance: str) -> int:
    """``decode-3`` -> 3."""
    return int(instance.rsplit("-", 1)[1])


def instances_of(role: Role, specs: Sequence[EngineSpec]) -> list[str]:
    """The role's running instances, by index."""
    return sorted({spec.instance for spec in specs if spec.role is role}, key=instance_index)


def next_indices(role: Role, specs: Sequence[EngineSpec], count: int) -> list[int]:
    """Indices for ``count`` new instances: after the highest one running."""
    running = [instance_index(instance) for instance in instances_of(role, specs)]
    first = max(running) + 1 if running else 0
    return list(range(first, first + count))


def instances_to_remove(role: Role, specs: Sequence[EngineSpec], count: int) -> list[str]:
    """The ``count`` instances of ``role`` with the highest indices; ConfigError when that
    would leave none."""
    running = instances_of(role, specs)
    if count >= len(running):
        raise ConfigError(f"scale {role.value} -{count} is invalid: {len(running)} {role.value} instance(s) run "
                          f"({', '.join(running) or 'none'}) and at least one must stay; remove at most "
                          f"{max(len(running) - 1, 0)}")  # fmt: skip
    return running[-count:]


def role_plan(config: ServiceConfig, role: Role) -> InstancePlan:
    return next(plan for plan in instance_plans(config) if plan.role is role)


def place_more(
    config: ServiceConfig,
    role: Role,
    indices: Sequence[int],
    running: Sequence[EngineSpec],
    ds_worker_addresses: Sequence[str],
    cores: Sequence[int],
) -> MorePlacements:
    """Where ``len(indices)`` new instances of ``role`` run, named by ``indices``.
    ``running``: the engines running now (their devices are taken); ``cores``: this
    process's CPU affinity (local mode, accelerators: the node's cores)."""
    plan = role_plan(config, role)
    if config.cluster_mode:
        return MorePlacements([_unplaced(plan, index, rank) for index in indices for rank in range(plan.data_parallel)])
    cpu = config.accelerator is Accelerator.CPU
    nodes = [replace(node, ds_worker_addresses=_least_used_first(node.ds_worker_addresses, running))
             for node in local_inventory(config, cores, ds_worker_addresses)]
    used = Counter((spec.node_id, unit) for spec in running for unit in spec.devices)
    pools = [(node, node.cores if cpu else node.devices) for node in nodes]
    free = [(node.node_id, unit) for node, pool in pools for unit in pool if not used[(node.node_id, unit)]]
    every = [(node.node_id, unit) for node, pool in pools for unit in pool]
    per_rank = config.cpu_cores_per_rank if cpu else 1
    needed = len(indices) * plan.data_parallel * plan.tensor_parallel * per_rank
    shared: tuple[int, ...] = ()
    if len(free) >= needed:
        chosen = set(free)
    elif cpu and needed <= len(every):  # free cores first, then the least used
        chosen = set(sorted(every, key=lambda unit: (used[unit], unit))[:needed])
        shared = tuple(sorted(unit for node_id, unit in chosen if used[(node_id, unit)]))
    else:
        tp_name, dp_name = _SETTINGS[role]
        size = f"{tp_name}={plan.tensor_parallel} x {dp_name}={plan.data_parallel}"
        visible = f"VISIBLE_DEVICES={','.join(map(str, config.devices)) or '(none)'}"
        if cpu:  # cores can be shared, but not by one engine's own ranks
            raise ConfigError(
                f"cannot add {len(indices)} {role.value} instance(s): they need {needed} cpu cores ({size} x "
                f"CPU_CORES_PER_RANK={per_rank} each), more than the {len(every)} in {visible}, even shared; "
                "add fewer at a time, or redeploy with more cores"
            )
        raise ConfigError(
            f"cannot add {len(indices)} {role.value} instance(s): they need {needed} {config.accelerator.value} devices "
            f"({size} each), but {len(free)} of the {len(every)} in {visible} are free (the running engines use the "
            "rest; accelerator devices are not shared); scale another role in first, or redeploy with more devices"
        )
    request = PlacementRequest(
        accelerator=config.accelerator,
        instances=(InstanceRequest(role, len(indices), plan.tensor_parallel, plan.data_parallel),),
        cores_per_rank=config.cpu_cores_per_rank,
    )
    restricted = []
    for node, pool in pools:
        units = tuple(unit for unit in pool if (node.node_id, unit) in chosen)
        restricted.append(replace(node, cores=units) if cpu else replace(node, devices=units))
    try:
        placements = plan_placement([node for node in restricted if (node.cores if cpu else node.devices)], request)
    except PlacementError as exc:
        raise ConfigError(f"cannot add {len(indices)} {role.value} instance(s): {exc}") from None
    return MorePlacements([_renamed(p, indices[instance_index(p.instance)]) for p in placements], shared)


def _least_used_first(addresses: Sequence[str], running: Sequence[EngineSpec]) -> tuple[str, ...]:
    """A node's data system workers, the one fewest running engines attach to first (the
    planner hands them out in turn)."""
    attached = Counter(spec.ds_worker_address for spec in running)
    return tuple(sorted(addresses, key=lambda address: (attached[address], addresses.index(address))))


def _renamed(placement: EnginePlacement, index: int) -> EnginePlacement:
    instance = f"{placement.role.value}-{index}"
    name = instance if placement.dp_size == 1 else f"{instance}-dp{placement.dp_rank}"
    return replace(placement, name=name, instance=instance)


def _unplaced(plan: InstancePlan, index: int, rank: int) -> EnginePlacement:
    """Cluster mode: an engine the scheduler places (as controller/placement.py's ``_unplanned``)."""
    instance = f"{plan.role.value}-{index}"
    return EnginePlacement(
        name=instance if plan.data_parallel == 1 else f"{instance}-dp{rank}", instance=instance, role=plan.role,
        tensor_parallel=plan.tensor_parallel, dp_rank=rank, dp_size=plan.data_parallel, dp_local_rank=rank,
        dp_master_address="", node_id="", node_address="", devices=(), ds_worker_address="",
    )  # fmt: skip


def adopted_specs(
    config: ServiceConfig,
    specs: Sequence[EngineSpec],
    previous: Sequence[Mapping[str, object]],
    model_path: Path,
    served_model_name: str,
) -> list[EngineSpec]:
    """A deploy process restarted by the keeper (``--adopt``) takes over the engines the
    killed one ran, as scale operations left them (``previous``: state.json's engines):
    the configured ones still listed, then those a scale-out added (rebuilt from their
    rows: role, instance, devices, data system worker). Configured engines a scale-in
    removed stay removed. An empty ``previous`` keeps ``specs``."""
    listed = {str(engine["name"]) for engine in previous}
    if not listed:
        return list(specs)
    kept = [spec for spec in specs if spec.name in listed]
    known = {spec.name for spec in specs}
    roles = {plan.role.value: plan for plan in instance_plans(config)}
    added = [
        EnginePlacement(
            name=str(row["name"]), instance=str(row["instance"]), role=roles[str(row["role"])].role,
            tensor_parallel=roles[str(row["role"])].tensor_parallel, dp_rank=0, dp_size=1, dp_local_rank=0,
            dp_master_address="", node_id=str(row.get("node_id", "")), node_address=str(row.get("host", "")),
            devices=tuple(int(d) for d in row.get("devices") or ()),  # type: ignore[attr-defined]
            ds_worker_address=str(row.get("ds_worker_address", "")),
        )  # fmt: skip
        for row in previous
        if str(row["name"]) not in known and str(row.get("role")) in roles
    ]
    return kept + engine_specs(config, added, model_path, served_model_name)
