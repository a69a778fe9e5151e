"""Ascend NPU: KV blocks move between device memory and the data system through its
device API (``HeteroClient``), with no staging copy in our process.

``mset_d2h`` takes, per key, a ``DeviceBlobList``: the device addresses of every piece
of one block (each layer's K and V), which the data system gathers into one host
value; ``mget_h2d`` scatters such a value back into the blocks' device addresses.
The value format is the data system's, not the host path's, so NPU engines have their
own layout fingerprint (device family ``npu``) and never exchange bytes with CPU or
CUDA engines.

This path needs an NPU and the data system's ACL support; it cannot run on a machine
without one (``HeteroClient`` then fails with "No device manager available"). The
address computation (:func:`device_blob_lists`) is a pure function and is unit-tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.logger import init_logger

from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.sdk_threads import calm_sdk_threads
from patch.yuanrong_connector.store import PutResult

logger = init_logger(f"vllm.{__name__}")


def device_blob_lists(cache: PagedKVCache, block_ids: Sequence[int], device_index: int) -> list[Any]:
    """One ``DeviceBlobList`` per block: the (address, size) of each of its pieces, in
    stored-value order."""
    from yr.datasystem import Blob, DeviceBlobList

    return [
        DeviceBlobList(device_index, [Blob(address, size) for address, size in cache.block_spans(block_id)])
        for block_id in block_ids
    ]


class DeviceBlockStore:
    """Save and load whole blocks device-to-host and host-to-device in one batched call each."""

    def __init__(
        self, address: str, device_index: int, request_timeout_ms: int, ttl_s: int, exclusive_connection: bool = True
    ) -> None:
        from yr.datasystem import HeteroClient
        from yr.datasystem.kv_client import SetParam

        host, _, port = address.rpartition(":")
        self._client = HeteroClient(host, int(port), connect_timeout_ms=request_timeout_ms, req_timeout_ms=request_timeout_ms,
                                    enable_exclusive_connection=exclusive_connection)  # see BlockStore  # fmt: skip
        self._client.init()
        calm_sdk_threads()
        self._device_index = device_index
        self._timeout_ms = request_timeout_ms
        self._set_param = SetParam()
        self._set_param.ttl_second = ttl_s

    def save(self, keys: Sequence[str], cache: PagedKVCache, block_ids: Sequence[int]) -> PutResult:
        try:
            self._client.mset_d2h(list(keys), device_blob_lists(cache, block_ids, self._device_index), self._set_param)
        except Exception as exc:
            logger.warning("[device store] saving %d blocks failed: %s", len(keys), exc)
            return PutResult(failed=len(keys))
        return PutResult(stored=len(keys))

    def load(self, keys: Sequence[str], cache: PagedKVCache, block_ids: Sequence[int]) -> set[int]:
        """Write the blocks into device memory; return the block ids that failed."""
        try:
            failed_keys = set(
                self._client.mget_h2d(list(keys), device_blob_lists(cache, block_ids, self._device_index), self._timeout_ms)
                or ()
            )
        except Exception as exc:
            logger.warning("[device store] loading %d blocks failed: %s", len(keys), exc)
            return set(block_ids)
        return {block_id for key, block_id in zip(keys, block_ids) if key in failed_keys}
