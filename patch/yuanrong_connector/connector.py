"""YuanRongConnector: vLLM KV connector (v1) backed by the openYuanrong data system.

Loaded without touching vLLM's files::

    --kv-transfer-config '{"kv_connector": "YuanRongConnector",
                           "kv_connector_module_path": "patch.yuanrong_connector.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"ds_worker_address": "host:port",
                                                         "prefix_reuse": false,
                                                         "peer_tp_sizes": []}}'

(``peer_tp_sizes``: other TP sizes of this model whose blocks prefix reuse may load,
resharded; a prefill of another TP size is resharded without it: tp_layout.py.)

Hooks and the process that calls them:
- scheduler (EngineCore): get_num_new_matched_tokens, update_state_after_alloc,
  build_connector_meta, update_connector_output, request_finished
  -> ``scheduler.YuanRongScheduler``
- worker (model runner): register_kv_caches, start_load_kv, wait_for_save,
  get_finished, get_block_ids_with_load_errors, build_connector_worker_meta
  -> ``worker.YuanRongWorker``

Loads are vLLM's asynchronous loads: the request is parked with its blocks allocated,
a loader thread waits for and copies the blocks (loader.py), ``get_finished`` reports
the request loaded. Saves run in the background after the forward pass (saver.py), and
vLLM holds a finished request's blocks until they are saved (``request_finished`` ->
True, ``get_finished`` reports them). The connector's numbers reach the engine's log
and /metrics through vLLM's connector stats (stats.py).

Only KV layouts with a single KV cache group (every attention layer the same kind)
are handled; for others (hybrid models: sliding window + full, Mamba) the connector
says so once and does nothing, and the engine computes every prompt itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from patch.yuanrong_connector.metadata import YuanRongConnectorMetadata
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.scheduler import YuanRongScheduler
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.spin import cap_reader_spin
from patch.yuanrong_connector.stats import YuanRongConnectorStats, YuanRongPromMetrics
from patch.yuanrong_connector.worker import YuanRongWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")


class YuanRongConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = ConnectorSettings.from_vllm_config(vllm_config)
        store = RemoteBlockStore(
            settings.ds_address,
            request_timeout_ms=settings.request_timeout_ms,
            ttl_s=settings.ttl_s,
            retry_s=settings.store_retry_s,
            exclusive_connection=settings.exclusive_connection,
            check_bytes=settings.check_bytes,
        )
        self._scheduler: YuanRongScheduler | None = None
        self._worker: YuanRongWorker | None = None
        if settings.layout.device_family == "cpu":
            cap_reader_spin(0.0)  # see spin.py: the spin starves the store and the forward pass
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = YuanRongScheduler(settings, store, enabled=groups == 1)
            if groups != 1:
                logger.warning(
                    "[connector] this model's KV cache has %d groups (hybrid attention or state layers); "
                    "YuanRongConnector handles one: nothing is saved or loaded, every prompt is computed here",
                    groups,
                )
            if settings.prefix_reuse:
                store.connect()  # lookups; a handoff alone makes no store call in this process
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = YuanRongWorker(
                settings, store, tp_rank=get_tensor_model_parallel_rank(), num_blocks=kv_cache_config.num_blocks
            )

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def _metadata(self) -> YuanRongConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, YuanRongConnectorMetadata)
        return meta

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None and isinstance(kv_connector_metadata, YuanRongConnectorMetadata)
        self._worker.release_preempted(kv_connector_metadata.preempted)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once its blocks are in place

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # every layer of a block is saved together, in the background, after the forward pass

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.end_step(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        idle = isinstance(meta, YuanRongConnectorMetadata) and meta.idle_step
        saved, loaded = self._worker.finished(finished_req_ids, idle_step=idle)
        return saved or None, loaded or None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self._worker is not None
        return self._worker.worker_metadata()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_failed_block_ids()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return YuanRongConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return YuanRongPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)
