"""The placement planner: which engine of which instance runs on which node, with which
devices (and, for CPU engines, which cores). A pure function of a node inventory and the
instance settings; nothing here reads the machine or the runtime.

Rules (those of the openYuanrong sample, plus refusals it lacks):

- a TP group never spans nodes: each engine's TP ranks sit on one node;
- an instance's DP ranks are packed into node-sized groups: the whole instance on the
  tightest node that holds it, else as many ranks as fit on the roomiest node, then the
  next, so an instance spans as few nodes as it can;
- instances with larger engines are placed first (first-fit decreasing), then devices are
  handed out per node in the instances' own order (prefill before decode, ranks in order),
  so a single node gets today's in-order assignment;
- an impossible request is refused with one line (``PlacementError``) before anything
  starts: TP larger than any node, not enough devices (or cores) in all, or free devices so
  fragmented over the nodes that a TP group finds no node.

Accelerator engines use device ids; CPU engines use cores (``cores_per_rank`` per TP rank),
and their "devices" in the plan are those cores. Memory is checked only where both the
inventory and the request state it.

In cluster mode the inventory comes from openYuanrong's resource view
(:func:`inventory_from_resource_view`); the device ids there are nominal (the view has
counts), and the runtime picks the real devices when it places the engine actor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.config import Accelerator, Role
from common.errors import ConfigError

# Settings that name each role's counts in refusals (colocated instances use the prefill ones).
_SETTINGS = {
    Role.PREFILL: ("PREFILL_INS_NUM", "PTP", "PDP"),
    Role.DECODE: ("DECODE_INS_NUM", "DTP", "DDP"),
    Role.COLOCATED: ("PREFILL_INS_NUM", "PTP", "PDP"),
    Role.ADAPTIVE: ("PREFILL_INS_NUM + DECODE_INS_NUM", "PTP", "PDP"),
}
_NODES_LISTED = 8  # a refusal lists this many nodes' free counts, then "and N more"


class PlacementError(ConfigError):
    """The requested instances cannot be placed on the nodes (exit 2: nothing started)."""


@dataclass(frozen=True)
class Node:
    """One node of the inventory, with what is free on it now."""

    node_id: str
    address: str  # where other nodes and the front door reach it
    accelerator: Accelerator  # the kind of its devices (CPU: it has none, only cores)
    devices: tuple[int, ...]  # free accelerator device ids
    cores: tuple[int, ...]  # free CPU core ids
    memory_mb: int = 0  # free memory; 0: unknown (not checked)
    device_capacity: int = 0  # devices it has, free or not; 0: as many as are free
    ds_worker_addresses: tuple[str, ...] = ()  # its data system worker(s); engines attach in turn

    @property
    def capacity(self) -> int:
        return self.device_capacity or len(self.devices)


@dataclass(frozen=True)
class InstanceRequest:
    role: Role
    count: int  # instances of this role
    tensor_parallel: int
    data_parallel: int  # engines per instance


@dataclass(frozen=True)
class PlacementRequest:
    accelerator: Accelerator
    instances: tuple[InstanceRequest, ...]
    visible_devices: tuple[int, ...] | None = None  # ids usable on every node (CPU: cores); None: all free ones
    cores_per_rank: int = 1  # CPU engines: cores per TP rank
    memory_mb_per_engine: int = 0  # 0: not checked


@dataclass(frozen=True)
class EnginePlacement:
    """Where one engine (one DP rank of one instance) runs."""

    name: str  # e.g. decode-0-dp1 (just decode-0 when the instance has one rank)
    instance: str  # e.g. decode-0
    role: Role
    tensor_parallel: int
    dp_rank: int
    dp_size: int
    dp_local_rank: int  # its rank among the instance's ranks on the same node
    dp_master_address: str  # the node of the instance's rank 0
    node_id: str
    node_address: str
    devices: tuple[int, ...]  # accelerator ids; CPU engines: their cores
    ds_worker_address: str  # the data system worker it attaches to, on its node ("" : none known)


def plan_placement(nodes: Sequence[Node], request: PlacementRequest) -> list[EnginePlacement]:
    """Place every engine of ``request`` on ``nodes``, or raise PlacementError (one line)."""
    cpu = request.accelerator is Accelerator.CPU
    kind = "cpu cores" if cpu else f"{request.accelerator.value} devices"
    if not nodes:
        raise PlacementError("the node inventory is empty: no node to place engines on; start openYuanrong agents "
                             "(yr start) or deploy in local mode")  # fmt: skip
    _check_unique_ids(nodes)
    usable = {node.node_id: _usable(node, request) for node in nodes}
    hosts = [node for node in nodes if (cpu or node.accelerator is request.accelerator) and usable[node.node_id]]
    if not hosts:
        raise PlacementError(f"ACCELERATOR={request.accelerator.value} is invalid for these nodes: none has free "
                             f"{kind} ({_free_summary(nodes, usable)}); choose the accelerator the nodes have")  # fmt: skip
    units = {i: _units(spec, request) for i, spec in enumerate(request.instances)}
    _check_tp_fits_a_node(hosts, request, units, kind)
    _check_totals(hosts, usable, request, units, kind)
    chosen = _choose_nodes(hosts, usable, request, units, kind)
    return _assign(hosts, usable, request, units, chosen)


def _check_unique_ids(nodes: Sequence[Node]) -> None:
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise PlacementError(f"node id {node.node_id} appears twice in the inventory; node ids must be unique")
        seen.add(node.node_id)


def _usable(node: Node, request: PlacementRequest) -> tuple[int, ...]:
    free = node.cores if request.accelerator is Accelerator.CPU else node.devices
    if request.visible_devices is None:
        return free
    visible = set(request.visible_devices)
    return tuple(unit for unit in free if unit in visible)


def _units(spec: InstanceRequest, request: PlacementRequest) -> int:
    """Devices (CPU: cores) one engine of this instance takes on its node."""
    return spec.tensor_parallel * (request.cores_per_rank if request.accelerator is Accelerator.CPU else 1)


def _tp_text(spec: InstanceRequest, request: PlacementRequest) -> str:
    _, tp_name, _ = _SETTINGS[spec.role]
    text = f"{tp_name}={spec.tensor_parallel}"
    if request.accelerator is Accelerator.CPU and request.cores_per_rank != 1:
        text += f" x CPU_CORES_PER_RANK={request.cores_per_rank}"
    return text


def _check_tp_fits_a_node(
    hosts: Sequence[Node], request: PlacementRequest, units: Mapping[int, int], kind: str
) -> None:
    cpu = request.accelerator is Accelerator.CPU
    largest = max(hosts, key=lambda n: len(n.cores) if cpu else n.capacity)
    size = len(largest.cores) if cpu else largest.capacity
    for index, spec in enumerate(request.instances):
        if spec.count and units[index] > size:
            raise PlacementError(
                f"{_tp_text(spec, request)} is invalid: one engine needs {units[index]} {kind} on one node "
                f"(TP never spans nodes), but the largest node ({largest.node_id}) has {size}; "
                f"lower {_SETTINGS[spec.role][1]} to at most {size // (units[index] // spec.tensor_parallel)}"
            )


def _check_totals(hosts: Sequence[Node], usable: Mapping[str, tuple[int, ...]], request: PlacementRequest,
                  units: Mapping[int, int], kind: str) -> None:  # fmt: skip
    needed = sum(spec.count * spec.data_parallel * units[i] for i, spec in enumerate(request.instances))
    free = sum(len(usable[node.node_id]) for node in hosts)
    if needed > free:
        terms = " + ".join(
            f"{_SETTINGS[s.role][0]}={s.count} x {_tp_text(s, request)} x {_SETTINGS[s.role][2]}={s.data_parallel}"
            for s in request.instances
        )
        raise PlacementError(f"{terms} needs {needed} {kind}, but the {len(hosts)} node(s) have {free} free "
                             f"({_free_summary(hosts, usable)}); lower the counts or add nodes")  # fmt: skip
    engines = sum(spec.count * spec.data_parallel for spec in request.instances)
    if request.memory_mb_per_engine and all(node.memory_mb for node in hosts):
        memory = sum(node.memory_mb for node in hosts)
        if engines * request.memory_mb_per_engine > memory:
            raise PlacementError(f"{engines} engines need {engines * request.memory_mb_per_engine} MB of memory "
                                 f"({request.memory_mb_per_engine} MB each), but the nodes have {memory} MB free; "
                                 "lower the counts or add nodes")  # fmt: skip


def _choose_nodes(hosts: Sequence[Node], usable: Mapping[str, tuple[int, ...]], request: PlacementRequest,
                  units: Mapping[int, int], kind: str) -> dict[tuple[int, int, int], int]:  # fmt: skip
    """(request index, instance index, dp rank) -> index into ``hosts``; larger engines first."""
    free = [len(usable[node.node_id]) for node in hosts]
    memory = [node.memory_mb for node in hosts]
    per_engine_mb = request.memory_mb_per_engine
    memory_known = [bool(per_engine_mb and node.memory_mb) for node in hosts]

    def ranks_fitting(h: int, unit: int) -> int:
        by_units = free[h] // unit
        return min(by_units, memory[h] // per_engine_mb) if memory_known[h] else by_units

    chosen: dict[tuple[int, int, int], int] = {}
    order = sorted(range(len(request.instances)), key=lambda i: -units[i])  # stable: ties keep their order
    for i in order:
        spec, unit = request.instances[i], units[i]
        for instance in range(spec.count):
            rank, remaining = 0, spec.data_parallel
            while remaining:
                fitting = [(ranks_fitting(h, unit), h) for h in range(len(hosts))]
                holds_all = [(free[h], h) for n, h in fitting if n >= remaining]
                if holds_all:
                    _, h = min(holds_all)  # the tightest node that holds the rest: best fit
                else:
                    n, h = max(fitting, key=lambda pair: (pair[0], -pair[1]))  # the roomiest, first on a tie
                    if n == 0:
                        raise _fragmented(spec, instance, rank, request, unit, kind, hosts, free, bool(chosen))
                take = min(remaining, ranks_fitting(h, unit))
                for _ in range(take):
                    chosen[(i, instance, rank)] = h
                    rank += 1
                free[h] -= take * unit
                if memory_known[h]:
                    memory[h] -= take * per_engine_mb
                remaining -= take
    return chosen


def _fragmented(spec: InstanceRequest, instance: int, rank: int, request: PlacementRequest, unit: int, kind: str,
                hosts: Sequence[Node], free: Sequence[int], placed_before: bool) -> PlacementError:  # fmt: skip
    name = _engine_name(spec, instance, rank)
    listed = ", ".join(f"{node.node_id} {count}" for node, count in list(zip(hosts, free))[:_NODES_LISTED])
    if len(hosts) > _NODES_LISTED:
        listed += f", and {len(hosts) - _NODES_LISTED} more"
    return PlacementError(
        f"{_tp_text(spec, request)} cannot be placed: engine {name} needs {unit} {kind} on one node (TP never spans "
        f"nodes), but the free {kind} are fragmented, at most {max(free)} on any node"
        f"{' after placing the engines before it' if placed_before else ''} (free: {listed}); "
        f"free whole nodes, or lower {_SETTINGS[spec.role][1]}"
    )


def _assign(hosts: Sequence[Node], usable: Mapping[str, tuple[int, ...]], request: PlacementRequest,
            units: Mapping[int, int], chosen: Mapping[tuple[int, int, int], int]) -> list[EnginePlacement]:  # fmt: skip
    """Hand out concrete ids per node in the instances' own order."""
    next_unit = [0] * len(hosts)
    attached = [0] * len(hosts)  # engines attached so far to each node's workers (in turn)
    plan: list[EnginePlacement] = []
    for i, spec in enumerate(request.instances):
        unit = units[i]
        for instance in range(spec.count):
            master = hosts[chosen[(i, instance, 0)]].address
            local_ranks: dict[int, int] = {}
            for rank in range(spec.data_parallel):
                h = chosen[(i, instance, rank)]
                node = hosts[h]
                ids = usable[node.node_id][next_unit[h] : next_unit[h] + unit]
                next_unit[h] += unit
                workers = node.ds_worker_addresses
                worker = workers[attached[h] % len(workers)] if workers else ""
                attached[h] += 1
                local_rank = local_ranks.get(h, 0)
                local_ranks[h] = local_rank + 1
                plan.append(EnginePlacement(
                    name=_engine_name(spec, instance, rank), instance=f"{spec.role.value}-{instance}", role=spec.role,
                    tensor_parallel=spec.tensor_parallel, dp_rank=rank, dp_size=spec.data_parallel,
                    dp_local_rank=local_rank, dp_master_address=master, node_id=node.node_id,
                    node_address=node.address, devices=ids, ds_worker_address=worker,
                ))  # fmt: skip
    return plan


def _engine_name(spec: InstanceRequest, instance: int, rank: int) -> str:
    name = f"{spec.role.value}-{instance}"
    return name if spec.data_parallel == 1 else f"{name}-dp{rank}"


def _free_summary(nodes: Sequence[Node], usable: Mapping[str, tuple[int, ...]]) -> str:
    listed = ", ".join(f"{node.node_id} {len(usable[node.node_id])}" for node in nodes[:_NODES_LISTED])
    return listed + (f", and {len(nodes) - _NODES_LISTED} more" if len(nodes) > _NODES_LISTED else "")


def format_plan(plan: Sequence[EnginePlacement]) -> list[str]:
    """One line per engine, as the deploy log and docs/placement.md show a plan."""
    rows = [("ENGINE", "NODE", "ADDRESS", "DEVICES", "DP", "DS WORKER")]
    for p in plan:
        rows.append((p.name, p.node_id, p.node_address, ",".join(map(str, p.devices)) or "-",
                     f"{p.dp_rank}/{p.dp_size}", p.ds_worker_address or "-"))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


# --- cluster mode: the inventory from openYuanrong's resource view ----------------------

_DEVICE_KEY = re.compile(r"^(GPU|NPU)/[^/]+/count$")
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
_KIND_OF_KEY = {"GPU": Accelerator.CUDA, "NPU": Accelerator.ASCEND}


def inventory_from_resource_view(view: Sequence[Mapping[str, object]], ds_worker_port: int) -> list[Node]:
    """Nodes from what ``yr.resources()`` returns in cluster mode (SDK 0.9.10, ``yr/apis.py``)::

        [{"id": "function-agent-192.0.2.2-25742", "status": 0,
          "capacity":    {"CPU": 8000.0, "Memory": 65536.0, "NPU/910B/count": 8.0},
          "allocatable": {"CPU": 4000.0, "Memory": 32768.0, "NPU/910B/count": 4.0}}, ...]

    ``CPU`` is in millicores, ``Memory`` in MB, accelerators are custom resources named
    ``GPU/<model>/count`` or ``NPU/<model>/count``. A node whose status is not 0 is left
    out. The address is the IPv4 address in the id (an ``address`` key wins when present);
    the node's data system worker is ``<address>:<ds_worker_port>`` (openYuanrong runs one
    per node). Device ids are nominal (0..free-1): the view has counts, the runtime picks
    the devices.
    """
    nodes: list[Node] = []
    for entry in view:
        if int(entry.get("status", 0) or 0) != 0:  # type: ignore[call-overload]
            continue
        node_id = str(entry["id"])
        capacity = _resources(entry.get("capacity"))
        free = _resources(entry.get("allocatable"))
        accelerator, total, available = Accelerator.CPU, 0, 0
        for key, value in capacity.items():
            match = _DEVICE_KEY.match(key)
            if match and value > 0:
                accelerator = _KIND_OF_KEY[match.group(1)]
                total, available = int(value), int(free.get(key, 0.0))
                break
        address = str(entry.get("address") or _address_in(node_id))
        nodes.append(Node(
            node_id=node_id, address=address, accelerator=accelerator, devices=tuple(range(available)),
            cores=tuple(range(int(free.get("CPU", 0.0) // 1000))), memory_mb=int(free.get("Memory", 0.0)),
            device_capacity=total, ds_worker_addresses=(f"{address}:{ds_worker_port}",),
        ))  # fmt: skip
    return nodes


def _resources(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float))}


def _address_in(node_id: str) -> str:
    match = _IPV4.search(node_id)
    if match is None:
        raise PlacementError(f"node id {node_id} in openYuanrong's resource view has no IPv4 address; "
                             "expected an agent id such as function-agent-10.0.0.2-25742")  # fmt: skip
    return match.group(1)
