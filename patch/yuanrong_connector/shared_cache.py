"""A CPU engine's KV cache moved into shared memory, so the store helper copies blocks
straight between it and the data system (one copy each way, no arena).

vLLM allocates a CPU engine's whole KV cache as one tensor (``torch.zeros``). At
registration its pages are replaced, in place and chunk by chunk, by pages of a memfd:
each chunk's bytes are written to the memfd, then the memfd is mapped over the same
addresses (``MAP_SHARED | MAP_FIXED``). Every tensor view keeps its address and its
bytes; the store helpers map the same memfd and read or write blocks at their offsets.
Where the kernel refuses, the cache stays as it was and blocks move through the arena.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(f"vllm.{__name__}")

_CHUNK_BYTES = 64 * 1024 * 1024  # at most this much memory held twice while moving
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10  # <sys/mman.h>, the same on every Linux architecture (Python's mmap does not export it)


@dataclass(frozen=True)
class SharedRegion:
    """The memfd now behind ``[start, start + size)`` of this process's memory."""

    fd: int
    start: int  # page-aligned address in the engine's process
    size: int  # whole pages

    def offset(self, address: int) -> int:
        """Where ``address`` (inside the region) lies in the memfd."""
        if not self.start <= address < self.start + self.size:
            raise ValueError(f"address {address:#x} is outside the shared KV cache")
        return address - self.start


def share_memory(address: int, nbytes: int) -> SharedRegion:
    """Back the pages holding ``[address, address + nbytes)`` with a memfd, keeping their
    bytes (also those of other objects sharing the first or last page). Raises OSError
    when the kernel refuses; pages already moved stay moved and keep their bytes."""
    page = mmap.PAGESIZE
    start = address - address % page
    end = -(-(address + nbytes) // page) * page
    fd = os.memfd_create("yuanrong-kv-cache")
    try:
        os.ftruncate(fd, end - start)
        for chunk in range(start, end, _CHUNK_BYTES):
            size = min(_CHUNK_BYTES, end - chunk)
            written = os.pwrite(fd, (ctypes.c_char * size).from_address(chunk), chunk - start)
            if written != size:
                raise OSError(f"short write to the KV cache memfd: {written} of {size} bytes")
            mapped = _libc.mmap(chunk, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, chunk - start)
            if mapped in (None, _MAP_FAILED) or mapped != chunk:
                errno = ctypes.get_errno()
                raise OSError(errno, f"mapping the KV cache memfd over {chunk:#x}: {os.strerror(errno)}")
    except BaseException:
        os.close(fd)
        raise
    return SharedRegion(fd, start, end - start)


def share_cache_storage(kv_caches: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> SharedRegion | None:
    """Move a CPU engine's KV cache into shared memory when every layer lives in one torch
    storage (vLLM's single allocation); None, saying why, where it cannot be."""
    tensors = [t for value in kv_caches.values() for t in ([value] if isinstance(value, torch.Tensor) else value)]
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    if not tensors or len(storages) != 1 or tensors[0].device.type != "cpu":
        logger.info("[connector] KV cache not shared with the store helpers (%d allocations on %s): blocks move through "
                    "their arenas", len(storages), tensors[0].device if tensors else "no device")  # fmt: skip
        return None
    address, nbytes = storages.pop()
    try:
        region = share_memory(address, nbytes)
    except OSError as exc:
        logger.warning("[connector] could not share the KV cache with the store helpers (%s): blocks move through "
                       "their arenas", exc)  # fmt: skip
        return None
    logger.info("[connector] KV cache (%d MiB) shared with the store helpers: one copy per block each way",
                region.size >> 20)  # fmt: skip
    return region
