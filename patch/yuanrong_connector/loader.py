"""Loading a step's blocks layer by layer.

``start`` makes one batched, zero-copy read of every block the step loads (all
requests together; bounded by the store's request timeout). The blocks then enter
the paged cache one layer at a time:
- CUDA: every layer's host-to-device copy is issued at once on a side stream from
  pinned memory, with one event per layer; the forward pass waits (``wait_layer``)
  only for the layer it is about to run, so later layers' copies overlap compute;
- CPU: the copy of a layer is made in ``wait_layer``, just before that layer runs
  (the copy and the compute share the same cores, so there is nothing to overlap).
Blocks missing in the store or of the wrong size are reported for recompute and
never written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.logger import init_logger

from patch.yuanrong_connector.device_store import DeviceBlockStore
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats
from patch.yuanrong_connector.store import BlockStore

logger = init_logger(f"vllm.{__name__}")


@dataclass
class LayerwiseLoad:
    store: BlockStore
    staging: HostStaging
    layer_order: list[str]  # layer names in forward order
    keys: list[str]
    block_ids: list[int]
    failed_block_ids: set[int] = field(default_factory=set)
    stats: YuanRongConnectorStats = field(default_factory=YuanRongConnectorStats)
    _pending_layers: list[str] = field(default_factory=list)  # CPU: layers not written yet
    _layer_marker: dict[str, Any] = field(default_factory=dict)  # CUDA: event per layer
    _pairs: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    _buffers: list[Any] = field(default_factory=list)  # keeps the zero-copy views alive
    _seconds: float = 0.0
    _device_loaded: int = 0
    device_store: DeviceBlockStore | None = None  # Ascend: the data system writes device memory itself

    def start(self) -> None:
        started = time.perf_counter()
        cache = self.staging.cache
        if self.device_store is not None:  # all layers at once: the device API has no per-layer form
            self.failed_block_ids = self.device_store.load(self.keys, cache, self.block_ids)
            self._device_loaded = len(self.block_ids) - len(self.failed_block_ids)
            self._seconds += time.perf_counter() - started
            return
        self._buffers = self.store.get(self.keys)
        sources: list[torch.Tensor] = []
        targets: list[int] = []
        for block_id, buffer in zip(self.block_ids, self._buffers):
            view = None if buffer is None else buffer.immutable_data()
            if view is None or len(view) != cache.block_bytes:
                self.failed_block_ids.add(block_id)
                continue
            sources.append(torch.frombuffer(view, dtype=torch.uint8))
            targets.append(block_id)
        self._pairs = list(zip(targets, self.staging.stage_in(sources)))
        if self._pairs and self.staging.on_cuda:
            for name in self.layer_order:
                self._layer_marker[name] = self.staging.write_layer(cache.layer_pieces[name], self._pairs)
        elif self._pairs:
            self._pending_layers = list(self.layer_order)
        self._seconds += time.perf_counter() - started

    def wait_layer(self, layer_name: str) -> None:
        if self.staging.on_cuda:
            self.staging.wait_layer(self._layer_marker.get(layer_name))
            return
        if layer_name in self._pending_layers:
            started = time.perf_counter()
            self._pending_layers.remove(layer_name)
            self.staging.write_layer(self.staging.cache.layer_pieces[layer_name], self._pairs)
            self._seconds += time.perf_counter() - started

    def finish(self) -> None:
        """Write layers the forward pass did not ask for; wait for device copies."""
        for name in list(self._pending_layers):
            self.wait_layer(name)
        if self.staging.on_cuda:
            torch.cuda.current_stream().synchronize()
        loaded = len(self._pairs) + self._device_loaded
        self.stats.add("blocks_load", loaded)
        self.stats.add("bytes_load", loaded * self.staging.cache.block_bytes)
        self.stats.add("blocks_load_failed", len(self.failed_block_ids))
        if loaded:
            self.stats.time("load", self._seconds)
        self._pairs, self._buffers = [], []
