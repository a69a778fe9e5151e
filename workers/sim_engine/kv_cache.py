"""A simulated paged KV cache with prefix caching, as vLLM V1's block pool keeps it.

Blocks hold ``block_size`` tokens. A block that fills is named by a chained hash of its
tokens (the parent block's hash, its token ids, its extra keys) and kept under that name
for reuse; a request that ends returns its blocks to the free queue, where a named block
stays reusable until the block is needed for something else (least recently freed
first, a request's last block before its first, as vLLM frees them), which evicts it.
Every block named is announced as vLLM announces it (``BlockStored``, with its token ids
and its parent's hash), every eviction too (``BlockRemoved``); ``drain_events`` hands
them to the publisher once per scheduler step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.kv_wire import BlockRemoved, BlockStored, KVEvent

_MASK64 = (1 << 64) - 1
ROOT_HASH = 0x73696D5F726F6F74  # the chain's start ("sim_root")


def block_hash(parent: int, tokens: tuple[int, ...], extra: Any) -> int:
    return hash((parent, tokens, extra)) & _MASK64


def request_block_extras(cache_salt: str | None) -> list[Any]:
    """Extra keys of a request's first block (vLLM: ``cache_salt`` on the first block only)."""
    return [(cache_salt,)] if cache_salt else []


@dataclass
class _Block:
    block_id: int
    hash: int | None = None
    refs: int = 0


@dataclass
class Allocation:
    """A request's blocks, in order; the first ``named`` of them are full and named."""

    block_ids: list[int] = field(default_factory=list)
    named: int = 0
    hashes: list[int] = field(default_factory=list)  # the names of its full blocks so far


class SimKVCache:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache of {num_blocks} blocks of {block_size} tokens: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._events: list[KVEvent] = []
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks

    def prompt_hashes(self, tokens: Sequence[int], extras: list[Any]) -> list[int]:
        """The chained names of the full blocks of ``tokens``."""
        hashes: list[int] = []
        parent = ROOT_HASH
        size = self.block_size
        for index in range(len(tokens) // size):
            parent = block_hash(parent, tuple(tokens[index * size : (index + 1) * size]),
                                extras[index] if index < len(extras) else None)  # fmt: skip
            hashes.append(parent)
        return hashes

    def cached_blocks(self, hashes: Sequence[int], limit: int) -> int:
        """How many leading blocks of ``hashes`` (at most ``limit``) the cache holds."""
        if not self.prefix_caching:
            return 0
        count = 0
        for name in hashes[:limit]:
            if name not in self._by_hash:
                break
            count += 1
        return count

    def record_query(self, tokens: int, hit_tokens: int) -> None:
        self.queries += tokens
        self.hits += hit_tokens

    def blocks_needed(self, allocation: Allocation, tokens: int, hit_hashes: Sequence[int] = ()) -> int:
        """New blocks ``allocation`` needs to hold ``tokens`` tokens, after reusing ``hit_hashes``."""
        have = len(allocation.block_ids) + len(hit_hashes)
        return max(0, -(-tokens // self.block_size) - have)

    def can_allocate(self, allocation: Allocation, tokens: int, hit_hashes: Sequence[int] = ()) -> bool:
        reusable_free = sum(1 for name in hit_hashes if self._blocks[self._by_hash[name]].refs == 0)
        return self.blocks_needed(allocation, tokens, hit_hashes) <= len(self._free) - reusable_free

    def allocate(self, allocation: Allocation, tokens: int, hit_hashes: Sequence[int] = ()) -> None:
        """Give ``allocation`` the cached blocks ``hit_hashes`` (a fresh request's prefix
        hit), then new blocks up to ``tokens`` tokens; ``can_allocate`` must have said yes."""
        for name in hit_hashes:
            block = self._blocks[self._by_hash[name]]
            if block.refs == 0:
                del self._free[block.block_id]
            block.refs += 1
            allocation.block_ids.append(block.block_id)
            allocation.hashes.append(name)
        allocation.named = len(allocation.hashes)
        for _ in range(self.blocks_needed(allocation, tokens)):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.hash is not None:  # evicted from the prefix cache
                if self._by_hash.get(block.hash) == block_id:
                    del self._by_hash[block.hash]
                    self._events.append(BlockRemoved(block_hashes=[block.hash], medium="GPU"))
                block.hash = None
            block.refs = 1
            allocation.block_ids.append(block_id)

    def name_full_blocks(self, allocation: Allocation, tokens: Sequence[int], computed: int, extras: list[Any]) -> None:
        """Name the blocks of ``allocation`` that ``computed`` tokens have filled, and
        announce the ones cached (one ``BlockStored`` per run of consecutive blocks; a block
        whose name another block already holds is not cached twice, as in vLLM)."""
        full = min(computed // self.block_size, len(allocation.block_ids))
        first = allocation.named
        if full <= first:
            return
        size = self.block_size
        run: list[int] = []  # indices of the blocks cached in the current run
        for index in range(first, full):
            parent = allocation.hashes[index - 1] if index else ROOT_HASH
            name = block_hash(parent, tuple(tokens[index * size : (index + 1) * size]),
                              extras[index] if index < len(extras) else None)  # fmt: skip
            allocation.hashes.append(name)
            block = self._blocks[allocation.block_ids[index]]
            if self.prefix_caching and name not in self._by_hash:
                self._by_hash[name] = block.block_id
                block.hash = name
                run.append(index)
                continue
            self._announce(allocation, tokens, run, extras)
            run = []
        self._announce(allocation, tokens, run, extras)
        allocation.named = full

    def _announce(self, allocation: Allocation, tokens: Sequence[int], run: list[int], extras: list[Any]) -> None:
        if not run:
            return
        size, first, last = self.block_size, run[0], run[-1] + 1
        self._events.append(BlockStored(
            block_hashes=allocation.hashes[first:last],
            parent_block_hash=allocation.hashes[first - 1] if first else None,
            token_ids=list(tokens[first * size : last * size]),
            block_size=size,
            extra_keys=[_wire_extra(extras[i]) if i < len(extras) else None for i in run] if first < len(extras) else None,
            medium="GPU",
        ))  # fmt: skip

    def free(self, allocation: Allocation) -> None:
        """Return a request's blocks, its last one first in line for eviction."""
        for block_id in reversed(allocation.block_ids):
            block = self._blocks[block_id]
            block.refs -= 1
            if block.refs == 0:
                if block.hash is None or not self.prefix_caching:
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)  # nothing to keep: used first
                else:
                    self._free[block_id] = None
        allocation.block_ids.clear()
        allocation.hashes.clear()
        allocation.named = 0

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events


def _wire_extra(extra: Any) -> Any:
    """An extra key as vLLM publishes it (tuples as lists)."""
    return list(extra) if isinstance(extra, tuple) else extra
