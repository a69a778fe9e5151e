"""Worker-side half of YuanRongConnector (runs where the model runs).

Per step: ``start_load`` begins the layer-by-layer load of the blocks the scheduler
planned (see loader.py), ``wait_layer`` is called before each attention layer,
``end_step`` (after the forward pass) completes the load and hands the step's saves to
the background saver (see saver.py). Blocks that fail to load are reported to vLLM,
which recomputes them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger

from patch.yuanrong_connector.device_store import DeviceBlockStore
from patch.yuanrong_connector.keys import block_key
from patch.yuanrong_connector.loader import LayerwiseLoad
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.saver import BackgroundSaver
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats
from patch.yuanrong_connector.store import BlockStore

logger = init_logger(f"vllm.{__name__}")

# Loaded blocks are zero-copy views of the store's read-only buffers; they are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

_SLACK_S = 10.0  # copy time allowed on top of the store's own request timeout


@dataclass
class YuanRongWorker:
    settings: ConnectorSettings
    store: BlockStore
    tp_rank: int
    num_blocks: int
    cache: PagedKVCache | None = None
    _staging: HostStaging | None = None
    _device_store: DeviceBlockStore | None = None
    _saver: BackgroundSaver | None = None
    _layer_order: list[str] = field(default_factory=list)
    _load: LayerwiseLoad | None = None
    _failed_block_ids: set[int] = field(default_factory=set)
    _stats: YuanRongConnectorStats = field(default_factory=YuanRongConnectorStats)

    @property
    def timeout_s(self) -> float:
        return self.settings.request_timeout_ms / 1000 + _SLACK_S

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.cache = PagedKVCache.register(kv_caches, self.num_blocks)
        self._layer_order = list(kv_caches)
        self._staging = HostStaging(self.cache)
        if self.cache.device.type == "npu":
            self._device_store = DeviceBlockStore(
                self.settings.ds_address, self.cache.device.index or 0, self.settings.request_timeout_ms, self.settings.ttl_s
            )
        if self.settings.saves:
            self._saver = BackgroundSaver(
                self.store, self._staging, self.settings.max_pending_save_blocks, self._device_store
            )
        self.store.connect()
        logger.info(
            "[connector rank=%d] registered %d KV layers (%d pieces per block) on %s, %d bytes per block, store %s",
            self.tp_rank,
            len(self._layer_order),
            len(self.cache.pieces),
            self.cache.device,
            self.cache.block_bytes,
            self.store.address,
        )

    def _keys(self, transfer: BlockTransfer) -> list[str]:
        fingerprint = self.settings.layout.fingerprint()
        return [block_key(fingerprint, self.tp_rank, h) for h in transfer.block_hashes]

    # ---- per step ----
    def start_load(self, meta: YuanRongConnectorMetadata) -> None:
        if meta.preempted and self._saver is not None:
            # Preempted requests' blocks are reused in this very step: finish reading them first.
            self._saver.wait_for(set(meta.preempted), self.timeout_s)
        if not meta.loads or self._staging is None:
            return
        keys = [key for transfer in meta.loads for key in self._keys(transfer)]
        block_ids = [block_id for transfer in meta.loads for block_id in transfer.block_ids]
        self._load = LayerwiseLoad(
            self.store, self._staging, self._layer_order, keys, block_ids, device_store=self._device_store
        )
        try:
            self._load.start()
        except Exception:
            logger.exception("[connector] loading %d blocks failed; vLLM recomputes them", len(block_ids))
            self._load.failed_block_ids.update(block_ids)

    def wait_layer(self, layer_name: str) -> None:
        if self._load is not None:
            self._load.wait_layer(layer_name)

    def end_step(self, meta: YuanRongConnectorMetadata) -> None:
        self._finish_load()
        if self._saver is None or self._staging is None or not meta.saves:
            return
        marker = self._staging.forward_done_marker()
        for transfer in meta.saves:
            self._saver.submit(transfer.request_id, self._keys(transfer), transfer.block_ids, marker)

    def _finish_load(self) -> None:
        load, self._load = self._load, None
        if load is None:
            return
        load.finish()
        self._stats.aggregate(load.stats)
        if load.failed_block_ids:
            logger.warning(
                "[connector] %d of %d blocks could not be loaded from the store; vLLM recomputes them",
                len(load.failed_block_ids),
                len(load.block_ids),
            )
        self._failed_block_ids |= load.failed_block_ids

    # ---- reported to vLLM ----
    def take_failed_block_ids(self) -> set[int]:
        self._finish_load()
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def finished_saving(self, finished_req_ids: set[str]) -> set[str]:
        return self._saver.finished_requests(finished_req_ids) if self._saver is not None else set()

    def take_stats(self) -> YuanRongConnectorStats | None:
        stats, self._stats = self._stats, YuanRongConnectorStats()
        if self._saver is not None:
            stats.aggregate(self._saver.take_stats())
        return None if stats.is_empty() else stats

    def wait_saved(self, timeout_s: float) -> bool:
        """Block until every save handed over so far is done (tests, benchmarks)."""
        return self._saver.wait_idle(timeout_s) if self._saver is not None else True

    def shutdown(self) -> None:
        self._finish_load()
        if self._saver is not None:
            self._saver.close(self.timeout_s)
