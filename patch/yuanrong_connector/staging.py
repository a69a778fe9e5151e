"""Moving block bytes between vLLM's paged cache and host memory the store can read.

- CPU caches: the store's shared-memory buffers are filled from, and read into, the
  cache directly (one copy each way, no staging).
- CUDA caches: blocks go through pinned host memory on a side stream: saving waits
  for an event recorded after the forward pass; loading (in the loader thread, for a
  request vLLM has parked) synchronises the side stream before the request is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from patch.yuanrong_connector.paged_cache import PagedKVCache


class HostStaging:
    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.on_cuda = cache.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(device=cache.device) if self.on_cuda else None

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
        staged = torch.empty((len(block_ids), self.cache.block_bytes), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(marker)
            self.cache.read_blocks(block_ids, list(staged.unbind(0)))
        self._stream.synchronize()

        def fill_from_pinned(first: int, buffers: list[memoryview]) -> None:
            targets = [torch.frombuffer(buffer, dtype=torch.uint8) for buffer in buffers]
            torch._foreach_copy_(targets, list(staged[first : first + len(buffers)].unbind(0)))

        return fill_from_pinned

    # ---- loading ----
    def write_blocks(self, pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Copy each (block id, stored value in host memory) into every layer of the cache;
        on return the blocks are in place (called from the loader thread)."""
        every_piece = range(len(self.cache.pieces))
        if not self.on_cuda:
            self.cache.write_pieces(every_piece, pairs)
            return
        pinned = torch.empty((len(pairs), self.cache.block_bytes), dtype=torch.uint8, pin_memory=True)
        torch._foreach_copy_(list(pinned.unbind(0)), [value for _, value in pairs])
        staged = [(block_id, pinned[row]) for row, (block_id, _) in enumerate(pairs)]
        with torch.cuda.stream(self._stream):
            self.cache.write_pieces(every_piece, staged)
        self._stream.synchronize()
