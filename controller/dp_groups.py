"""vLLM's own data parallelism (``DP_MODE=vllm``) on the planner's plan, as pure functions.

The planner (controller/planner.py) places each DP rank of an instance: its node, its
devices, ``dp_rank`` and the address of the rank-0 node. Under ``DP_MODE=vllm`` the ranks
one node holds become one engine (vllm 0.32, ``entrypoints/cli/serve.py``):

- the rank-0 node's group is the head: it keeps the instance's name (``decode-0``), serves
  HTTP (the door routes to it alone, and vLLM balances over the ranks), runs
  ``--data-parallel-size-local`` ranks from rank 0 and waits for the others at
  ``--data-parallel-address`` (the rank-0 node's address) and ``--data-parallel-rpc-port``;
- every other node's group is headless (``decode-0-node1``, ``decode-0-node2``, ... in rank
  order): ``--headless``, its ranks from ``--data-parallel-start-rank``, connecting to the
  head. It has no HTTP port; its engine actor supervises the process.

A group's devices are its ranks' devices in rank order: vLLM gives local DP rank r the
r-th TP-sized slice of ``CUDA_VISIBLE_DEVICES`` / ``ASCEND_RT_VISIBLE_DEVICES`` and the
r-th TP lists of ``VLLM_CPU_OMP_THREADS_BIND``. An instance of one rank starts as it does
under ``DP_MODE=independent``.

The RPC port is a pure function of the instance (``dp_rpc_port``), so every node knows it
before any engine starts: vLLM's default (29550) plus two per instance index, odd for
decode; below Linux's ephemeral range (32768 on), where the engines' other ports come from.

Cluster mode: the scheduler places engine actors by their resource requests and does not
follow the plan's nodes yet, so a headless engine could not know where its head landed.
An instance the plan spreads over nodes is refused; one on a single node becomes one head
whose DP address is resolved on the node it lands on (``resolve_on_node``). Without an
inventory (no plan: every rank's node is ""), each instance's ranks are one group, and the
scheduler has to find a node with all its devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import groupby

from common.config import Role
from controller.planner import EnginePlacement, PlacementError
from workers.engine_process import VllmDataParallel

DP_RPC_PORT_BASE = 29550  # vLLM's own default --data-parallel-rpc-port
_LAST_RPC_PORT = 32767  # below the ephemeral range


@dataclass(frozen=True)
class DPEngine:
    """One engine to start: ``placement`` names it, its node and all its devices (its
    first rank's otherwise); ``data_parallel`` is None for an engine of one rank."""

    placement: EnginePlacement
    data_parallel: VllmDataParallel | None


def dp_rpc_port(role: Role, instance_index: int) -> int:
    """The DP handshake port of instance ``instance_index`` of ``role`` (prefill and
    colocated even, decode odd), the same on every node."""
    port = DP_RPC_PORT_BASE + 2 * instance_index + (1 if role is Role.DECODE else 0)
    if port > _LAST_RPC_PORT:
        raise PlacementError(f"{role.value}-{instance_index} has no DP RPC port: instance indices above "
                             f"{(_LAST_RPC_PORT - DP_RPC_PORT_BASE) // 2} run past port {_LAST_RPC_PORT}; "
                             "redeploy to start the indices from 0 again")  # fmt: skip
    return port


def independent_engines(placements: Sequence[EnginePlacement]) -> list[DPEngine]:
    """``DP_MODE=independent``: every rank its own engine."""
    return [DPEngine(placement, None) for placement in placements]


def vllm_dp_engines(placements: Sequence[EnginePlacement], cluster_mode: bool) -> list[DPEngine]:
    """``DP_MODE=vllm``: one engine per node of each instance, in the plan's order (an
    instance's head first); PlacementError when cluster mode would need a headless engine."""
    engines: list[DPEngine] = []
    for _, ranks in groupby(placements, key=lambda p: p.instance):
        engines.extend(_instance_engines(list(ranks), cluster_mode))
    return engines


def _instance_engines(ranks: list[EnginePlacement], cluster_mode: bool) -> list[DPEngine]:
    first = ranks[0]
    if first.dp_size == 1:
        return [DPEngine(first, None)]
    if [p.dp_rank for p in ranks] != list(range(first.dp_size)):
        raise ValueError(f"{first.instance}: the plan lists ranks {[p.dp_rank for p in ranks]}, "
                         f"not 0..{first.dp_size - 1} in order")  # fmt: skip
    groups = [list(group) for _, group in groupby(ranks, key=lambda p: p.node_id)]
    nodes = [group[0].node_id for group in groups]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"{first.instance}: the ranks on a node are not consecutive (nodes in rank order: {nodes})")
    if cluster_mode and len(groups) > 1:
        setting = "DDP" if first.role is Role.DECODE else "PDP"
        raise PlacementError(
            f"DP_MODE=vllm cannot start {first.instance}: the plan spreads its {first.dp_size} DP ranks over "
            f"{len(groups)} nodes ({', '.join(nodes)}), and in cluster mode the scheduler does not follow the plan's "
            f"nodes yet, so its headless engines could not find their head; lower {setting} to what one node "
            "holds, or set DP_MODE=independent"
        )
    # Cluster mode: the one group is the head, whose ranks meet on whatever node it lands on.
    address = "" if cluster_mode else first.dp_master_address
    port = dp_rpc_port(first.role, int(first.instance.rsplit("-", 1)[1]))
    engines = []
    for ordinal, group in enumerate(groups):
        name = first.instance if ordinal == 0 else f"{first.instance}-node{ordinal}"
        merged = replace(group[0], name=name, devices=tuple(d for p in group for d in p.devices))
        dp = VllmDataParallel(size=first.dp_size, size_local=len(group), start_rank=group[0].dp_rank,
                              address=address, rpc_port=port)  # fmt: skip
        engines.append(DPEngine(merged, dp))
    return engines
