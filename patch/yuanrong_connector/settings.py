"""What the connector reads from vLLM's config: its role, its store, its KV layout and
the limits that keep a slow or absent store from hurting requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patch.yuanrong_connector.keys import KVLayout, model_identity, model_options
from patch.yuanrong_connector.tp_layout import TPLayoutError, check_tp_size

if TYPE_CHECKING:
    from vllm.config import VllmConfig

DS_ADDRESS_FIELD = "ds_worker_address"


@dataclass(frozen=True)
class ConnectorSettings:
    ds_address: str
    saves: bool  # this engine writes prompts' blocks to the store (every prompt's, or only its prefill legs')
    prefix_reuse: bool  # this engine looks for any prompt's leading blocks in the store
    loads_remote_prefill: bool  # this engine loads blocks a prefill engine handed over
    layout: KVLayout
    ttl_s: int = 0  # seconds a stored block lives; 0: until deleted or the store restarts
    request_timeout_ms: int = 2000  # bound on every store call: a slow store is a miss
    handoff_wait_ms: int = 2000  # how long a decode waits for a prefill's blocks to be published
    max_pending_save_blocks: int = 4096  # save backlog beyond this is skipped (and counted)
    store_retry_s: float = 5.0  # after a store failure, calls are skipped (miss) this long
    exclusive_connection: bool = True  # each store client gets its own connection to the worker (store.py)
    check_bytes: bool = True  # loads check each block's checksum, not only its key and length (integrity.py)
    # Prefix reuse: TP sizes of other engines of this model whose blocks are looked up
    # (and resharded on load) when this engine's own TP size has fewer; a handoff says its own.
    peer_tp_sizes: tuple[int, ...] = ()
    # False (kv_both with ``handoff_saves`` and no prefix reuse, ROLES=adaptive): only the
    # prompts of prefill legs (``do_remote_decode``) are saved, for their decode leg elsewhere.
    saves_every_prompt: bool = True

    @staticmethod
    def from_vllm_config(vllm_config: VllmConfig) -> ConnectorSettings:
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        extra: dict[str, Any] = dict(transfer.kv_connector_extra_config or {})
        address = extra.get(DS_ADDRESS_FIELD)
        if not address:
            raise ValueError(
                f"YuanRongConnector needs kv_connector_extra_config.{DS_ADDRESS_FIELD} "
                "(host:port of a data system worker) in --kv-transfer-config"
            )
        prefix_reuse = bool(extra.get("prefix_reuse", False))
        handoff_saves = bool(extra.get("handoff_saves", False))  # kv_both: save prefill legs
        role = transfer.kv_role
        layout = layout_of(vllm_config)
        return ConnectorSettings(
            ds_address=str(address),
            saves=role == "kv_producer" or (role == "kv_both" and (prefix_reuse or handoff_saves)),
            saves_every_prompt=role == "kv_producer" or prefix_reuse,
            prefix_reuse=prefix_reuse,
            loads_remote_prefill=role in ("kv_consumer", "kv_both"),
            layout=layout,
            ttl_s=_non_negative(extra, "ttl_s", 0),
            request_timeout_ms=_non_negative(extra, "request_timeout_ms", 2000),
            handoff_wait_ms=_non_negative(extra, "handoff_wait_ms", 2000),
            max_pending_save_blocks=_non_negative(extra, "max_pending_save_blocks", 4096),
            store_retry_s=float(extra.get("store_retry_s", 5.0)),
            exclusive_connection=bool(extra.get("exclusive_connection", True)),
            check_bytes=bool(extra.get("check_bytes", True)),
            peer_tp_sizes=peer_tp_sizes(extra.get("peer_tp_sizes", ()), layout),
        )


def peer_tp_sizes(value: Any, layout: KVLayout) -> tuple[int, ...]:
    """``kv_connector_extra_config.peer_tp_sizes``: other TP sizes this model runs at whose
    blocks prefix reuse may reshard (this engine's own size is left out)."""
    try:
        sizes = [int(size) for size in (value.split(",") if isinstance(value, str) else value)]
        for size in sizes:
            check_tp_size(layout.num_kv_heads, size)
    except (TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, TPLayoutError) else "not a list of integers"
        raise ValueError(
            f"kv_connector_extra_config.peer_tp_sizes={value!r} is invalid ({reason}): list TP sizes >= 1 "
            f"this model's {layout.num_kv_heads} KV heads shard over, or leave it out"
        ) from exc
    return tuple(dict.fromkeys(size for size in sizes if size != layout.tp_size))


def _non_negative(extra: dict[str, Any], name: str, default: int) -> int:
    value = extra.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise ValueError(f"kv_connector_extra_config.{name}={value!r} is invalid: must be an integer >= 0")
    return number


def layout_of(vllm_config: VllmConfig) -> KVLayout:
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    dtype = str(model.dtype) if cache.cache_dtype == "auto" else str(cache.cache_dtype)
    text_config = model.hf_text_config
    rope = getattr(text_config, "rope_scaling", None) or getattr(text_config, "rope_parameters", None)
    options = model_options(str(model.dtype), model.quantization, model.revision, model.hf_overrides, rope)
    return KVLayout(
        model=model_identity(str(model.model)),
        dtype=dtype,
        block_size=int(cache.block_size),
        # All ranks' heads (TP-independent, so engines of other TP sizes can reshard): MLA keeps one latent on every rank
        num_kv_heads=1 if model.use_mla else int(model.get_total_num_kv_heads()),
        head_size=int(model.get_head_size()),
        num_layers=int(model.get_num_layers(parallel)),
        tp_size=int(parallel.tensor_parallel_size),
        device_family=str(current_platform.device_type),
        options=options,
    )
