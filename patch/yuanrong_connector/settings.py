"""What the connector reads from vLLM's config: its role, its store, its KV layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from patch.yuanrong_connector.keys import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig

DS_ADDRESS_FIELD = "ds_worker_address"
PREFIX_REUSE_FIELD = "prefix_reuse"


@dataclass(frozen=True)
class ConnectorSettings:
    ds_address: str
    saves: bool  # this engine writes its prompts' blocks to the store
    prefix_reuse: bool  # this engine looks for any prompt's leading blocks in the store
    loads_remote_prefill: bool  # this engine loads blocks a prefill engine handed over
    layout: KVLayout

    @staticmethod
    def from_vllm_config(vllm_config: VllmConfig) -> ConnectorSettings:
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        address = transfer.get_from_extra_config(DS_ADDRESS_FIELD, None)
        if not address:
            raise ValueError(
                f"YuanRongConnector needs kv_connector_extra_config.{DS_ADDRESS_FIELD} "
                "(host:port of a data system worker) in --kv-transfer-config"
            )
        prefix_reuse = bool(transfer.get_from_extra_config(PREFIX_REUSE_FIELD, False))
        role = transfer.kv_role
        return ConnectorSettings(
            ds_address=str(address),
            saves=role == "kv_producer" or (role == "kv_both" and prefix_reuse),
            prefix_reuse=prefix_reuse,
            loads_remote_prefill=role in ("kv_consumer", "kv_both"),
            layout=layout_of(vllm_config),
        )


def layout_of(vllm_config: VllmConfig) -> KVLayout:
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    dtype = str(model.dtype) if cache.cache_dtype == "auto" else str(cache.cache_dtype)
    return KVLayout(
        model=str(model.model),
        dtype=dtype,
        block_size=int(cache.block_size),
        num_kv_heads=int(model.get_num_kv_heads(parallel)),
        head_size=int(model.get_head_size()),
        num_layers=int(model.get_num_layers(parallel)),
        tp_size=int(parallel.tensor_parallel_size),
    )
