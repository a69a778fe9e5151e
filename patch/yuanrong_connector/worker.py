"""Worker-side half of YuanRongConnector (runs where the model runs).

A stored value is one block of every layer, layer after layer in name order, each
layer's block exactly as vLLM's paged cache holds it. Saving reads the registered
caches after the step's forward pass (so one batched store call covers all layers);
loading writes them before the forward pass. Blocks that fail to load are reported
to vLLM, which recomputes them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger

from patch.yuanrong_connector.keys import block_key
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore

logger = init_logger(f"vllm.{__name__}")

# Loaded blocks are zero-copy views of the store's read-only buffers; they are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def block_axis(kv_layer: torch.Tensor, num_blocks: int) -> int:
    """The axis of a layer's cache that indexes blocks: 0 (CPU, ``[blocks, ...]``) or
    1 (``[2, blocks, ...]`` layouts that keep K and V apart)."""
    if kv_layer.shape[0] == num_blocks:
        return 0
    if kv_layer.dim() > 1 and kv_layer.shape[0] == 2 and kv_layer.shape[1] == num_blocks:
        return 1
    raise ValueError(f"cannot find the block axis of a KV cache of shape {tuple(kv_layer.shape)}")


@dataclass
class YuanRongWorker:
    settings: ConnectorSettings
    store: BlockStore
    tp_rank: int
    num_blocks: int
    _layers: list[torch.Tensor] = field(default_factory=list)
    _axes: list[int] = field(default_factory=list)
    _layer_bytes: list[int] = field(default_factory=list)
    _failed_block_ids: set[int] = field(default_factory=set)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        seen: set[int] = set()
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            if tensor.data_ptr() in seen:  # layers sharing one cache are stored once
                continue
            seen.add(tensor.data_ptr())
            axis = block_axis(tensor, self.num_blocks)
            self._layers.append(tensor)
            self._axes.append(axis)
            self._layer_bytes.append(tensor.select(axis, 0).numel() * tensor.element_size())
        logger.info(
            "[connector rank=%d] registered %d KV layers, %d bytes per block, store %s",
            self.tp_rank,
            len(self._layers),
            self.block_bytes,
            self.store.address,
        )

    @property
    def block_bytes(self) -> int:
        return sum(self._layer_bytes)

    def _keys(self, transfer: BlockTransfer) -> list[str]:
        fingerprint = self.settings.layout.fingerprint()
        return [block_key(fingerprint, self.tp_rank, h) for h in transfer.block_hashes]

    def load(self, meta: YuanRongConnectorMetadata) -> None:
        for transfer in meta.loads:
            buffers = self.store.get(self._keys(transfer))
            for block_id, buffer in zip(transfer.block_ids, buffers):
                view = None if buffer is None else buffer.immutable_data()
                if view is None or len(view) != self.block_bytes:
                    self._failed_block_ids.add(block_id)
                    continue
                self._write_block(block_id, view)
            failed = sum(1 for b in transfer.block_ids if b in self._failed_block_ids)
            if failed:
                logger.warning(
                    "[connector req=%s] %d of %d blocks missing in the store; vLLM recomputes them",
                    transfer.request_id,
                    failed,
                    len(transfer.block_ids),
                )

    def _write_block(self, block_id: int, view: memoryview) -> None:
        source = torch.frombuffer(view, dtype=torch.uint8)
        offset = 0
        for layer, axis, size in zip(self._layers, self._axes, self._layer_bytes):
            target = layer.select(axis, block_id)
            chunk = source[offset : offset + size].view(layer.dtype).view(target.shape)
            target.copy_(chunk)
            offset += size

    def save(self, meta: YuanRongConnectorMetadata) -> None:
        for transfer in meta.saves:
            keys = self._keys(transfer)

            def fill(index: int, buffer: memoryview, block_ids: tuple[int, ...] = transfer.block_ids) -> None:
                self._read_block(block_ids[index], buffer)

            stored = self.store.put(keys, self.block_bytes, fill)
            if stored < len(keys):
                logger.warning(
                    "[connector req=%s] saved %d of %d blocks; the rest will be recomputed by readers",
                    transfer.request_id,
                    stored,
                    len(keys),
                )

    def _read_block(self, block_id: int, buffer: memoryview) -> None:
        target = torch.frombuffer(buffer, dtype=torch.uint8)
        offset = 0
        for layer, axis, size in zip(self._layers, self._axes, self._layer_bytes):
            block = layer.select(axis, block_id)
            if layer.device.type != "cpu":
                block = block.to("cpu")
            target[offset : offset + size].copy_(block.contiguous().view(torch.uint8).reshape(-1))
            offset += size

    def take_failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed
