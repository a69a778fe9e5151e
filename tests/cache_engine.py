"""An engine's KV cache as the connector's worker half sees it, without vLLM: every layer
a view of one allocation (as vLLM's allocate_kv_cache makes a CPU engine's), shared with
a real store helper of its own, as on a CPU engine. For tests of what reaches, or
leaves, the cache."""

from __future__ import annotations

import torch

from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import RemoteBlockStore
from patch.yuanrong_connector.shared_cache import share_cache_storage
from patch.yuanrong_connector.staging import HostStaging

BLOCK_SHAPE = (2, 16, 2, 32)  # [kv heads, block size, K and V, head size]: 8 KiB of float32 per layer


def vllm_like_cache(layers: int, blocks: int, fill: bool, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every layer a view of one allocation, random or zero."""
    per_layer = blocks * 2 * 16 * 2 * 32
    backing = torch.zeros(layers * per_layer, dtype=dtype)
    if fill:
        backing.normal_()
    return {f"model.layers.{i}.self_attn.attn": backing[i * per_layer : (i + 1) * per_layer].view(blocks, *BLOCK_SHAPE)
            for i in range(layers)}  # fmt: skip


class CacheEngine:
    """A KV cache shared with a store helper; ``staging`` saves and loads its blocks."""

    def __init__(self, address: str, fill: bool, layers: int = 2, blocks: int = 6, request_timeout_ms: int = 2000,
                 check_bytes: bool = True) -> None:  # fmt: skip
        self.cache = vllm_like_cache(layers, blocks, fill)
        self.staging = HostStaging(PagedKVCache.register(self.cache, blocks))
        self.store = RemoteBlockStore(address, request_timeout_ms=request_timeout_ms, check_bytes=check_bytes)
        region = share_cache_storage(self.cache)
        assert region is not None
        self.store.share_cache(region)
        assert self.store.connect()

    def block(self, block_id: int) -> list[torch.Tensor]:
        """A copy of every layer's block ``block_id``."""
        return [tensor[block_id].clone() for tensor in self.cache.values()]

    def reuse(self, block_id: int) -> None:
        """What vLLM does with a block it gave to another request: new bytes in it."""
        for tensor in self.cache.values():
            tensor[block_id].fill_(7.0)

    def close(self) -> None:
        self.store.close()
