"""Moving block bytes between vLLM's paged cache and host memory the store can read.

- CPU caches: the store's shared-memory buffers are filled from, and read into, the
  cache directly (one copy each way, no staging): by the store helper, in the cache's
  shared pages (``shared_cache``), or in this process with an in-process store.
- CUDA caches: blocks go through pinned host memory on a side stream. Saving waits for
  an event recorded after the forward pass; loading (in the loader thread, for a request
  vLLM has parked) synchronises the side stream before the request is reported.
  A block's pieces (K and V of every layer, e.g. 64 pieces of 32 KiB for Llama-3-8B)
  are gathered into (scattered from) a device buffer of whole blocks, one indexed copy
  per piece, so the bus sees one copy per chunk of blocks and Python does not loop over
  blocks x pieces; the device buffer is bounded (``DEVICE_CHUNK_BYTES``), not the size
  of the request. The host copy between pinned memory and the store's shared memory is
  what limits the rate (measured on an H100 host: ``benchmarks.cuda_staging``); chunks
  overlapping that copy with the device's were measured and gave nothing, and DMA
  straight into the store's memory needs it registered with CUDA, which the SDK's
  many ~2 GiB mappings of it make unsafe (see docs/kv-connector.md).

``save`` and ``load`` are the whole move between the cache and the store that the
background saver and loader run (and that ``benchmarks.cuda_staging`` times);
``load_resharded`` loads blocks engines of another TP size stored, through host memory.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import torch

from patch.yuanrong_connector.paged_cache import PagedKVCache
from patch.yuanrong_connector.remote_store import RemoteBlockStore, Store
from patch.yuanrong_connector.shared_cache import SharedRegion
from patch.yuanrong_connector.store import PutResult, leading_blocks
from patch.yuanrong_connector.tp_layout import ReshardPlan

# The most device memory one save or load borrows for gathering blocks (whole blocks,
# at least one): the engine sized its cache to the memory it was given.
DEVICE_CHUNK_BYTES = 64 * 1024 * 1024


class HostStaging:
    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.on_cuda = cache.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(device=cache.device) if self.on_cuda else None
        self._region_checked: SharedRegion | None = None  # the shared region every block was found inside

    @staticmethod
    def pin(view: memoryview) -> Callable[[], None]:
        """Page-lock host memory for CUDA (``cudaHostRegister``), so that copies between it
        and the device are direct DMA; gives the call that undoes it. For the store
        helper's arena (tens of MiB), not the data system's own shared memory (the SDK maps
        it as many ~2 GiB regions: registering them would lock all of it)."""
        anchor = (ctypes.c_char * len(view)).from_buffer(view)
        address = ctypes.addressof(anchor)
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(address, len(view), 0)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {len(view)} bytes failed: {error}")

        def unpin() -> None:
            cudart.cudaHostUnregister(address)
            anchor_alive.clear()  # the mapping may go now

        anchor_alive = [anchor]
        return unpin

    # ---- saving ----
    def forward_done_marker(self) -> Any:
        """Something to wait on before reading blocks the forward pass just wrote."""
        if self.cache.device.type == "npu":
            torch.npu.current_stream().synchronize()  # type: ignore[attr-defined]  # torch_npu
            return None
        if not self.on_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def block_reader(self, block_ids: Sequence[int], marker: Any) -> Callable[[int, list[memoryview]], None]:
        """``fill(first, buffers)``: write blocks ``block_ids[first:]`` into store buffers."""
        if not self.on_cuda:

            def fill_from_cache(first: int, buffers: list[memoryview]) -> None:
                targets = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in buffers]
                self.cache.read_blocks(block_ids[first : first + len(buffers)], targets)

            return fill_from_cache

        def fill_from_device(first: int, buffers: list[memoryview]) -> None:
            targets = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in buffers]
            self._device_to_store(block_ids[first : first + len(buffers)], targets, marker)

        return fill_from_device

    def _device_to_store(self, block_ids: Sequence[int], targets: list[torch.Tensor], marker: Any) -> None:
        staged: torch.Tensor | None = None
        if not all(target.is_pinned() for target in targets):  # else an arena registered with CUDA: no staging hop
            staged = torch.empty((len(block_ids), self.cache.block_bytes), dtype=torch.uint8, pin_memory=True)
        block_index = self._index(block_ids)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(marker)
            gathered = self._device_rows(len(block_ids))
            for first in range(0, len(block_ids), len(gathered)):
                count = min(len(gathered), len(block_ids) - first)
                self.cache.gather(block_index[first : first + count], gathered[:count])
                if staged is not None:
                    staged[first : first + count].copy_(gathered[:count], non_blocking=True)
                    continue
                for row in range(count):  # stream order: the next gather waits for these copies
                    targets[first + row].copy_(gathered[row], non_blocking=True)
        self._stream.synchronize()
        if staged is not None:
            torch._foreach_copy_(targets, list(staged.unbind(0)))

    # ---- loading ----
    def write_blocks(self, pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Copy each (block id, stored value in host memory) into every layer of the cache;
        on return the blocks are in place (called from the loader thread)."""
        every_piece = range(len(self.cache.pieces))
        if not self.on_cuda:
            self.cache.write_pieces(every_piece, pairs)
            return
        values = [value for _, value in pairs]
        pinned: torch.Tensor | None = None
        if not all(value.is_pinned() for value in values):  # else an arena registered with CUDA: no staging hop
            pinned = torch.empty((len(pairs), self.cache.block_bytes), dtype=torch.uint8, pin_memory=True)
            torch._foreach_copy_(list(pinned.unbind(0)), values)
        block_index = self._index([block_id for block_id, _ in pairs])
        with torch.cuda.stream(self._stream):
            gathered = self._device_rows(len(pairs))
            for first in range(0, len(pairs), len(gathered)):
                count = min(len(gathered), len(pairs) - first)
                if pinned is not None:
                    gathered[:count].copy_(pinned[first : first + count], non_blocking=True)
                else:
                    for row in range(count):
                        gathered[row].copy_(values[first + row], non_blocking=True)
                self.cache.scatter(block_index[first : first + count], gathered[:count])
        self._stream.synchronize()

    def _shared_spans(self, region: SharedRegion, block_ids: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Each block's pieces as (offset in the shared cache, size), in stored-value order."""
        if self._region_checked is not region:  # once: the first and last block of every piece lie inside it
            for pieces in self.cache.blocks_spans([0, self.cache.num_blocks - 1], region.start):
                for offset, size in pieces:
                    region.offset(region.start + offset)
                    region.offset(region.start + offset + size - 1)
            self._region_checked = region
        return self.cache.blocks_spans(block_ids, region.start)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            return torch.tensor(list(block_ids), dtype=torch.long).to(self.cache.device, non_blocking=True)

    def _device_rows(self, num_blocks: int) -> torch.Tensor:
        """A device buffer of up to ``num_blocks`` whole blocks, within DEVICE_CHUNK_BYTES
        (allocated on the side stream, where the caching allocator reuses it)."""
        rows = max(1, min(num_blocks, DEVICE_CHUNK_BYTES // self.cache.block_bytes))
        with torch.cuda.stream(self._stream):
            return torch.empty((rows, self.cache.block_bytes), dtype=torch.uint8, device=self.cache.device)

    # ---- the store ----
    def save(self, store: Store, keys: Sequence[str], block_ids: Sequence[int], marker: Any) -> PutResult:
        """Store blocks ``block_ids`` under ``keys``, published once written."""
        if not self.on_cuda and isinstance(store, RemoteBlockStore) and store.shared_cache is not None:
            return store.put_from(keys, self.cache.block_bytes, self._shared_spans(store.shared_cache, block_ids))
        return store.put(keys, self.cache.block_bytes, self.block_reader(block_ids, marker))

    def load(self, store: Store, keys: Sequence[str], block_ids: Sequence[int]) -> set[int]:
        """Copy stored blocks into the cache; return the block ids that could not be (from
        the first gap on: a missing or wrong-sized value, the blocks after it are computed)."""
        size = self.cache.block_bytes
        if not self.on_cuda and isinstance(store, RemoteBlockStore) and store.shared_cache is not None:
            copied = store.get_into(keys, size, self._shared_spans(store.shared_cache, block_ids))
            return set(block_ids[leading_blocks(copied, 1) :])
        per_move = store.max_blocks_per_move(size)
        for first in range(0, len(keys), per_move):
            chunk = keys[first : first + per_move]
            buffers = store.get(chunk, size)
            pairs: list[tuple[int, torch.Tensor]] = []
            for block_id, buffer in zip(block_ids[first : first + len(chunk)], buffers):
                view = None if buffer is None else buffer.immutable_data()
                if view is None or len(view) != size:
                    break
                pairs.append((block_id, torch.frombuffer(view, dtype=torch.uint8)))
            if pairs:
                self.write_blocks(pairs)
            del buffers  # the views were only needed for the copy
            if len(pairs) < len(chunk):
                return set(block_ids[first + len(pairs) :])
        return set()

    def load_resharded(self, store: Store, keys: Sequence[str], block_ids: Sequence[int], plan: ReshardPlan) -> set[int]:
        """Like ``load``, for blocks engines of another TP size stored: ``keys`` holds, per
        block, one key per rank of ``plan.source_ranks`` (block-major). Their values are read
        into host memory, this rank's heads assembled from them (``plan.convert``), and the
        result written as a stored value of ours would be. Only on a TP mismatch."""
        per_block = len(plan.source_ranks)
        size = plan.source_bytes
        blocks_per_move = max(1, store.max_blocks_per_move(size) // per_block)
        for first in range(0, len(block_ids), blocks_per_move):
            chunk = block_ids[first : first + blocks_per_move]
            buffers = store.get(keys[first * per_block : (first + len(chunk)) * per_block], size)
            views = [None if buffer is None else buffer.immutable_data() for buffer in buffers]
            complete = leading_blocks([view is not None and len(view) == size for view in views], per_block)
            if complete:
                sources = {
                    rank: torch.stack([torch.frombuffer(views[b * per_block + i], dtype=torch.uint8) for b in range(complete)])
                    for i, rank in enumerate(plan.source_ranks)
                }
                self.write_blocks(list(zip(chunk[:complete], plan.convert(sources).unbind(0))))
            del buffers, views  # the views were only needed for the copy
            if complete < len(chunk):
                return set(block_ids[first + complete :])
        return set()
