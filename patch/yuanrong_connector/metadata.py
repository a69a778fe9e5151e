"""The per-step message from the scheduler-side connector to the worker-side one."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request to move between vLLM's paged cache and the store."""

    request_id: str
    block_hashes: tuple[str, ...]
    block_ids: tuple[int, ...]


@dataclass
class YuanRongConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # their blocks are reused this step
