"""The messages between the two halves: scheduler -> worker once per step
(``YuanRongConnectorMetadata``), worker -> scheduler once per step
(``YuanRongWorkerMetadata``, aggregated over TP ranks by vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request to move between vLLM's paged cache and the store.

    For a load, ``wait_s`` > 0 means the blocks were announced by a prefill engine and
    may still be in flight: the loader waits up to that long for them to be published.
    ``source_tp``: the TP size of the engines that stored the blocks, where it is not this
    engine's (each rank then assembles its heads from their shards: tp_layout.py)."""

    request_id: str
    block_hashes: tuple[str, ...]
    block_ids: tuple[int, ...]
    wait_s: float = 0.0
    source_tp: int | None = None


@dataclass
class YuanRongConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)  # asynchronous: reported through get_finished
    saves: list[BlockTransfer] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # their blocks are reused this step
    idle_step: bool = False  # nothing is computed this step: the worker may wait briefly for a load


@dataclass
class YuanRongWorkerMetadata(KVConnectorWorkerMetadata):
    """What the scheduler half needs to plan only saves that will happen."""

    save_blocks_done: int = 0  # blocks whose save ended (stored, present, or failed) since start
    saves_paused: bool = False  # the store refuses saves now (full, or down): plan none

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, YuanRongWorkerMetadata)
        return YuanRongWorkerMetadata(
            save_blocks_done=min(self.save_blocks_done, other.save_blocks_done),  # the slowest rank's backlog
            saves_paused=self.saves_paused or other.saves_paused,
        )
