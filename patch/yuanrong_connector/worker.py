"""Worker-side half of YuanRongConnector (runs where the model runs).

Per step: ``release_preempted`` (before the forward pass) lets preempted requests'
saves finish reading their blocks, ``start_load`` hands the step's loads to the background loader (loader.py;
vLLM parks those requests until ``get_finished`` reports them), ``end_step`` (after the
forward pass) hands the step's saves to the background saver (saver.py). Blocks that
fail to load are reported to vLLM, which recomputes them. Blocks another TP size
stored are loaded with a ``tp_layout.ReshardPlan`` made once per TP size; a rank that
cannot make one (Ascend's device path, a block whose heads axis is unclear) reports
those loads failed. Each step's
``worker_metadata`` tells the scheduler half how far the saves got and whether the
store takes saves, so it plans only saves that will happen.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger

from patch.yuanrong_connector.device_store import DeviceBlockStore
from patch.yuanrong_connector.keys import block_keys
from patch.yuanrong_connector.loader import BackgroundLoader
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata, YuanRongWorkerMetadata
from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import CUDA_ARENA_BYTES, RemoteBlockStore, Store
from patch.yuanrong_connector.saver import BackgroundSaver
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.shared_cache import share_cache_storage
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats
from patch.yuanrong_connector.tp_layout import ReshardPlan, TPLayoutError, local_heads, plan_reshard

logger = init_logger(f"vllm.{__name__}")

# Loaded blocks are zero-copy views of the store's read-only buffers; they are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

_SLACK_S = 10.0  # copy time allowed on top of the store's own request timeout
# A step with nothing to compute (requests parked for their loads) sleeps until a load
# ends, at most this long, instead of returning at once into a busy engine loop.
_IDLE_STEP_WAIT_S = 0.005


@dataclass
class YuanRongWorker:
    settings: ConnectorSettings
    store: Store  # the saver's; the loader gets a sibling (its own helper)
    tp_rank: int
    num_blocks: int
    cache: PagedKVCache | None = None
    _staging: HostStaging | None = None
    _device_store: DeviceBlockStore | None = None
    _saver: BackgroundSaver | None = None
    _loader: BackgroundLoader | None = None
    _load_store: Store | None = None  # the loader's: its own helper, so a save never delays a load
    _failed_block_ids: set[int] = field(default_factory=set)
    _loading: set[str] = field(default_factory=set)
    _plans: dict[int, ReshardPlan | None] = field(default_factory=dict)  # source TP size -> plan (None: refused)

    @property
    def timeout_s(self) -> float:
        return self.settings.request_timeout_ms / 1000 + _SLACK_S

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.cache = PagedKVCache.register(kv_caches, self.num_blocks)
        self._staging = HostStaging(self.cache)
        if self.cache.device.type == "cpu" and isinstance(self.store, RemoteBlockStore):  # before the loader's sibling is made
            region = share_cache_storage(kv_caches)
            if region is not None:
                self.store.share_cache(region)
        if self._staging.on_cuda and isinstance(self.store, RemoteBlockStore):  # before the loader's sibling is made
            self.store.arena_pinner = HostStaging.pin
            self.store.arena_bytes = max(self.store.arena_bytes, CUDA_ARENA_BYTES)
        if self.cache.device.type == "npu":
            self._device_store = DeviceBlockStore(
                self.settings.ds_address, self.cache.device.index or 0, self.settings.request_timeout_ms, self.settings.ttl_s,
                self.settings.exclusive_connection,
            )
        if self.settings.saves:
            self._saver = BackgroundSaver(
                self.store, self._staging, self.settings.max_pending_save_blocks, self._device_store
            )
        if self.settings.prefix_reuse or self.settings.loads_remote_prefill:
            self._load_store = self.store.sibling()
            self._load_store.connect()
            self._loader = BackgroundLoader(self._load_store, self._staging, self._device_store)
        if self._saver is not None:
            self.store.connect()
        logger.info(
            "[connector rank=%d] registered %d KV layers (%d pieces per block) on %s, %d bytes per block, store %s",
            self.tp_rank,
            len(kv_caches),
            len(self.cache.pieces),
            self.cache.device,
            self.cache.block_bytes,
            self.store.address,
        )

    def _keys(self, transfer: BlockTransfer) -> list[str]:
        return block_keys(self.settings.layout, (self.tp_rank,), transfer.block_hashes)

    def _reshard_plan(self, source_tp: int) -> ReshardPlan | None:
        """How this rank assembles its heads from values ``source_tp`` ranks stored (made
        once per size); None where it cannot (said once)."""
        if source_tp in self._plans:
            return self._plans[source_tp]
        layout, plan = self.settings.layout, None
        try:
            if self._device_store is not None:
                raise TPLayoutError("values stored through the Ascend device path are not resharded")
            assert self.cache is not None  # loads come only once the caches are registered
            geometry = self.cache.head_geometry(local_heads(layout.num_kv_heads, layout.tp_size))
            plan = plan_reshard(geometry, layout.num_kv_heads, source_tp, layout.tp_size, self.tp_rank)
        except TPLayoutError as exc:
            logger.warning("[connector rank=%d] blocks of TP size %d are computed, not loaded: %s", self.tp_rank, source_tp, exc)
        self._plans[source_tp] = plan
        return plan

    # ---- per step ----
    def release_preempted(self, preempted: list[str]) -> None:
        """Called before the forward pass: preempted requests' blocks are reused in this
        very step, so their queued saves are dropped and a save under way has finished
        reading them."""
        if preempted and self._saver is not None:
            self._saver.release(set(preempted), self.timeout_s)

    def start_load(self, meta: YuanRongConnectorMetadata) -> None:
        if self._loader is None:
            return
        for transfer in meta.loads:
            self._loading.add(transfer.request_id)
            if transfer.source_tp is None:
                self._loader.submit(transfer.request_id, self._keys(transfer), transfer.block_ids, transfer.wait_s)
                continue
            plan = self._reshard_plan(transfer.source_tp)
            if plan is None:
                self._loader.refuse(transfer.request_id, transfer.block_ids)
                continue
            keys = block_keys(self.settings.layout.with_tp(transfer.source_tp), plan.source_ranks, transfer.block_hashes)
            self._loader.submit(transfer.request_id, keys, transfer.block_ids, transfer.wait_s, plan)

    def end_step(self, meta: YuanRongConnectorMetadata) -> None:
        if self._saver is None or self._staging is None or not meta.saves:
            return
        marker = self._staging.forward_done_marker()
        for transfer in meta.saves:
            self._saver.submit(transfer.request_id, self._keys(transfer), transfer.block_ids, marker)

    # ---- reported to vLLM ----
    def finished(self, finished_req_ids: set[str], idle_step: bool) -> tuple[set[str], set[str]]:
        """(requests whose saves ended, requests whose loads ended) since the last call."""
        saved = self._saver.finished_requests(finished_req_ids) if self._saver is not None else set()
        if self._loader is None:
            return saved, set()
        if finished_req_ids & self._loading:
            self._loader.cancel(finished_req_ids & self._loading)  # aborted while loading
        if idle_step:
            self._loader.wait_for_progress(_IDLE_STEP_WAIT_S)
        loaded: set[str] = set()
        for outcome in self._loader.take_outcomes():
            loaded.add(outcome.request_id)
            self._failed_block_ids |= outcome.failed_block_ids
        self._loading -= loaded
        return saved, loaded

    def take_failed_block_ids(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def worker_metadata(self) -> YuanRongWorkerMetadata | None:
        if self._saver is None:
            return None
        return YuanRongWorkerMetadata(save_blocks_done=self._saver.done_blocks, saves_paused=not self.store.takes_saves)

    def take_stats(self) -> YuanRongConnectorStats | None:
        stats = YuanRongConnectorStats()
        for part in (self._saver, self._loader):
            if part is not None:
                stats.aggregate(part.take_stats())
        return None if stats.is_empty() else stats

    def wait_loaded(self, request_id: str, timeout_s: float) -> set[int] | None:
        """Step as an idle engine would until ``request_id`` is reported loaded; the block
        ids reported failed in that same pass, or None on timeout (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if request_id in self.finished(set(), idle_step=True)[1]:
                return self.take_failed_block_ids()
        return None

    def wait_saved(self, timeout_s: float) -> bool:
        """Block until every save handed over so far is done (tests, benchmarks)."""
        return self._saver.wait_idle(timeout_s) if self._saver is not None else True

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.close(self.timeout_s)
        if self._saver is not None:
            self._saver.close(self.timeout_s)
        for store in (self.store, self._load_store):
            if store is not None:
                store.close()
