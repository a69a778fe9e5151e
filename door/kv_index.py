"""Which engine holds which prompt blocks: an index fed by vLLM's KV cache events.

Blocks are named by the door's chained token hash (door/kv_chain.py).

State, per engine (a small int id; sets of engines are int bitmasks over the ids, named
by a ``Roster``: a snapshot, replaced when an engine comes or goes):
- per medium ("GPU": the engine's own KV cache, on every backend; "CPU"/"STORAGE":
  offload tiers), a dict engine block hash -> chained hash, in store order, so
  ``BlockRemoved`` (engine hashes only) can be applied; a block stored twice (two
  physical copies, or an offload chunk re-announcing a shared prefix) needs two
  removals (reference count, kept only for counts above one);
- per medium, a global dict chained hash -> bitmask of the engines holding it.

Engine hashes are kept as 64-bit ints (the last 8 bytes of vLLM's sha256, which is what
vLLM publishes with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), so either publisher
setting indexes the same.

Bounded memory: at most ``max_blocks`` (engine, medium, block) entries. Past the cap
(checked after each batch), the oldest-stored entries of the engine holding the most
are dropped, in chunks, until 1/64 of the cap is free: a busy engine cannot push the
others out. Dropped entries make the index under-report (a request is routed as if the
block were not cached), never over-report; an evicted block also hides its descendants
from ``match``. Each engine's cache is bounded itself (its KV blocks, plus offload
tiers), so a cap above their sum is never reached; it guards against a publisher whose
removals are lost. Measured: ~150 bytes per entry (``benchmarks.kv_index_scale``: 1.02M
entries of 256 engines, 146 MiB), so the default 2M entries is ~300 MiB at most.

The data system tier, estimated (``track_store=True``, for deployments that reuse
prefixes through the data system): every block an engine announces in its device cache
has been, or is being, saved to the data system by our connector, and stays there after
the engine evicts it. The index keeps the chained hashes of the blocks ever announced
(bounded: the oldest forgotten past ``max_blocks``; not forgotten when an engine drops
or restarts) and ``store_match`` counts a prompt's leading blocks among them. It
over-reports what the store evicted (TTL, a full store) or has not saved yet: the
engine then computes those blocks, as it would have anyway.

``match`` answers with a ``Held`` (door/kv_holders.py).

Provisional holdings (``hold``): door/kv_claims.py.

``drop(engine)`` forgets one engine's entries (its events were lost, or it restarted),
its provisional holdings too; ``remove(engine)`` also frees its id. Events of another KV
cache group than ``group_idx``, of another block size (hybrid models' partial blocks),
and blocks whose parent the index does not know are ignored (counted in ``stats``).
Requests must not ask vLLM for ``kv_cache_report_mode: "full"`` (sampling ``extra_args``):
it re-announces reused blocks with no removal to match, which the reference count would
keep forever.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from common.kv_wire import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash
from door.kv_chain import ROOT, chained_hashes, engine_hash, hashable, request_extra_keys
from door.kv_claims import Claims, Hold
from door.kv_holders import Held, Roster, drop_outs, unset_holder

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOCKS = 2_000_000
DEFAULT_PROVISIONAL_TTL_S = 10.0  # a routed prompt's blocks count as held this long without the engine's events
DEFAULT_MAX_PROVISIONAL = 250_000  # provisional claims (routed prompts' blocks not yet confirmed)


class _Tier:
    """One engine's blocks in one medium."""

    __slots__ = ("blocks", "extra_refs", "holders", "bit")

    def __init__(self, holders: dict[int, int], bit: int) -> None:
        self.blocks: dict[int, int] = {}  # engine hash -> chained hash, oldest store first
        self.extra_refs: dict[int, int] = {}  # engine hash -> stores beyond the first, when > 0
        self.holders = holders  # this medium's chained hash -> engine bitmask
        self.bit = bit


@dataclass
class _Engine:
    id: int
    bit: int
    tiers: dict[str, _Tier]
    provisional: dict[int, Hold] = field(default_factory=dict)  # device chained hash -> the claim that holds it


@dataclass
class IndexStats:
    engines: int
    entries: int
    blocks_by_medium: dict[str, int]  # distinct chained hashes
    ignored_blocks: int  # other group or block size, or unaligned events
    unresolved_blocks: int  # parent unknown to the index
    evicted_entries: int  # dropped by the cap
    dropped_entries: int  # dropped with an engine (lost events, restart, removal)
    provisional_entries: int  # (engine, block) claims of routed prompts not yet confirmed by events
    confirmed_provisional: int  # claims the engine's BlockStored made ordinary entries
    expired_provisional: int  # claims ended by the TTL or the cap


class KVIndex:
    def __init__(
        self,
        block_size: int,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        group_idx: int = 0,
        track_store: bool = False,
        provisional_ttl_s: float = DEFAULT_PROVISIONAL_TTL_S,
        max_provisional: int = DEFAULT_MAX_PROVISIONAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size={block_size}: must be the engines' KV block size (> 0)")
        if max_blocks <= 0:
            raise ValueError(f"max_blocks={max_blocks}: must be > 0")
        if provisional_ttl_s <= 0:
            raise ValueError(f"provisional_ttl_s={provisional_ttl_s}: must be > 0 (seconds)")
        if max_provisional < 0:
            raise ValueError(f"max_provisional={max_provisional}: must be >= 0 (0: no provisional holdings)")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.group_idx = group_idx
        self.provisional_ttl_s = provisional_ttl_s
        self.max_provisional = max_provisional
        self._clock = clock
        self._slack = max(max_blocks // 64, 1)
        self._engines: dict[str, _Engine] = {}
        self._roster = Roster()
        self._free_ids: list[int] = []  # heap: ids are reused smallest first, keeping bitmasks short
        self._holders: dict[str, dict[int, int]] = {}  # medium -> chained hash -> engine bitmask
        self._entries = 0
        self._ignored = 0
        self._unresolved = 0
        self._evicted = 0
        self._dropped = 0
        self._in_store: dict[int, None] | None = {} if track_store else None  # chained hashes, oldest first
        self._claims = Claims(self._holders, provisional_ttl_s, max_provisional, clock)

    # -- queries (the request path) ------------------------------------------------

    def hashes(
        self, token_ids: Sequence[int], lora_name: str | None = None, cache_salt: str | None = None
    ) -> list[int]:
        """The chained hashes of a request's full blocks, to pass to ``match``."""
        extra = request_extra_keys(len(token_ids) // self.block_size, lora_name, cache_salt)
        return chained_hashes(token_ids, self.block_size, extra)

    def match(self, hashes: Sequence[int], medium: str = MEDIUM_GPU) -> Held:
        """By engine, how many leading blocks of the prompt (``hashes()``) it holds in
        ``medium``; engines holding none are absent. Provisional holdings count as device
        hits (the module docstring); the expired ones go first."""
        holds = self._claims.queue
        if holds and holds[0].deadline <= self._clock():
            self._claims.expire()
        holders = self._holders.get(medium)
        return Held(drop_outs(holders, hashes) if holders else [], self._roster)

    def store_match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt the data system holds (estimated, see the
        module docstring); 0 when the index does not track the store."""
        in_store = self._in_store
        if not in_store:
            return 0
        held = 0
        for block_hash in hashes:
            if block_hash not in in_store:
                break
            held += 1
        return held

    # -- engines ---------------------------------------------------------------------

    def engines(self) -> list[str]:
        return list(self._engines)

    def entries(self, engine: str | None = None) -> int:
        if engine is None:
            return self._entries
        known = self._engines.get(engine)
        return 0 if known is None else sum(len(tier.blocks) for tier in known.tiers.values())

    def _engine(self, name: str) -> _Engine:
        known = self._engines.get(name)
        if known is None:
            engine_id = heapq.heappop(self._free_ids) if self._free_ids else len(self._roster.names)
            self._roster = self._roster.with_name(engine_id, name)
            known = self._engines[name] = _Engine(id=engine_id, bit=1 << engine_id, tiers={})
        return known

    def drop(self, name: str) -> int:
        """Forget everything ``name`` holds (its events were lost, or it restarted); the
        engine stays known. Returns the entries dropped."""
        engine = self._engines.get(name)
        if engine is None:
            return 0
        dropped = 0
        for tier in engine.tiers.values():
            dropped += self._evict(tier, len(tier.blocks))
        engine.tiers.clear()
        self._dropped += dropped
        unclaimed = self._claims.unclaim_all(engine)
        if dropped or unclaimed:
            logger.info("[engine=%s] KV index entries dropped: %d (and %d provisional)", name, dropped, unclaimed)
        return dropped

    def remove(self, name: str) -> None:
        """Forget ``name`` altogether (it left the deployment)."""
        if name not in self._engines:
            return
        self.drop(name)
        engine = self._engines.pop(name)
        self._roster = self._roster.with_name(engine.id, None)
        heapq.heappush(self._free_ids, engine.id)

    # -- events ----------------------------------------------------------------------

    def apply(self, name: str, events: Iterable[object]) -> None:
        """Apply one batch of ``name``'s events, in order."""
        engine = self._engine(name)
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(engine, event)
            elif isinstance(event, BlockRemoved):
                self._removed(engine, event)
            elif isinstance(event, AllBlocksCleared):
                self.drop(name)
        if self._entries > self.max_blocks:
            self._enforce_cap()

    def _tier(self, engine: _Engine, medium: str) -> _Tier:
        tier = engine.tiers.get(medium)
        if tier is None:
            holders = self._holders.setdefault(medium, {})
            tier = engine.tiers[medium] = _Tier(holders, engine.bit)
        return tier

    def _parent_chain(self, engine: _Engine, medium: str, parent: ExternalBlockHash | None) -> int | None:
        if parent is None:
            return ROOT
        key = engine_hash(parent)
        own = engine.tiers.get(medium)
        if own is not None and key in own.blocks:
            return own.blocks[key]
        for tier in engine.tiers.values():  # an offload tier's chunk may follow a device block
            if key in tier.blocks:
                return tier.blocks[key]
        return None

    def _stored(self, engine: _Engine, event: BlockStored) -> None:
        size = self.block_size
        count = len(event.block_hashes)
        if (
            event.block_size != size
            or (event.group_idx is not None and event.group_idx != self.group_idx)
            or len(event.token_ids) != count * size
            or (event.extra_keys is not None and len(event.extra_keys) != count)
        ):
            self._ignored += count
            return
        medium = event.medium or MEDIUM_GPU
        chain = self._parent_chain(engine, medium, event.parent_block_hash)
        if chain is None:
            self._unresolved += count
            return
        tier = self._tier(engine, medium)
        blocks, holders, bit = tier.blocks, tier.holders, tier.bit
        tokens = tuple(event.token_ids)
        extras = event.extra_keys
        in_store = self._in_store if medium == MEDIUM_GPU else None
        provisional = engine.provisional if medium == MEDIUM_GPU else None
        for index, block_hash in enumerate(event.block_hashes):
            extra = None if extras is None or extras[index] is None else hashable(extras[index])
            chain = hash((chain, tokens[index * size : (index + 1) * size], extra))
            if provisional and chain in provisional:  # claimed when routed: confirmed, the bit stays
                self._claims.confirm(provisional, chain)
            if in_store is not None:
                in_store.pop(chain, None)  # now the newest
                in_store[chain] = None
                if len(in_store) > self.max_blocks:
                    del in_store[next(iter(in_store))]
            key = engine_hash(block_hash)
            if key in blocks:  # another copy: one more removal before it is gone; now the newest
                tier.extra_refs[key] = tier.extra_refs.get(key, 0) + 1
                blocks[key] = blocks.pop(key)
                continue
            blocks[key] = chain
            self._entries += 1
            mask = holders.get(chain)
            holders[chain] = bit if mask is None else mask | bit

    def _removed(self, engine: _Engine, event: BlockRemoved) -> None:
        if event.group_idx is not None and event.group_idx != self.group_idx:
            return
        tier = engine.tiers.get(event.medium or MEDIUM_GPU)
        if tier is None:
            return
        blocks, extra_refs = tier.blocks, tier.extra_refs
        for block_hash in event.block_hashes:
            key = engine_hash(block_hash)
            chain = blocks.get(key)
            if chain is None:
                continue  # never indexed (ignored, unresolved, evicted or dropped)
            more = extra_refs.get(key)
            if more:
                if more == 1:
                    del extra_refs[key]
                else:
                    extra_refs[key] = more - 1
                continue
            del blocks[key]
            self._entries -= 1
            unset_holder(tier.holders, chain, tier.bit)

    def _evict(self, tier: _Tier, count: int) -> int:
        """Forget ``tier``'s ``count`` oldest entries."""
        blocks = tier.blocks
        oldest = list(itertools.islice(blocks, count))  # one pass over the dict's front
        for key in oldest:
            chain = blocks.pop(key)
            tier.extra_refs.pop(key, None)
            unset_holder(tier.holders, chain, tier.bit)
        self._entries -= len(oldest)
        return len(oldest)

    def _enforce_cap(self) -> None:
        target = self.max_blocks - self._slack
        tiers = [tier for engine in self._engines.values() for tier in engine.tiers.values()]
        evicted = 0
        while self._entries > target:
            largest = max(tiers, key=lambda tier: len(tier.blocks))
            evicted += self._evict(largest, min(self._entries - target, max(len(largest.blocks) // 8, 1)))
        self._evicted += evicted
        logger.debug("KV index at its cap of %d entries: %d oldest dropped", self.max_blocks, evicted)

    # -- provisional holdings ------------------------------------------------------------

    def hold(self, name: str, hashes: Sequence[int]) -> int:
        """``name`` will compute the prompt of ``hashes`` (``hashes()``): until its events
        confirm them or ``provisional_ttl_s`` passes, it holds the prompt's blocks in its
        device cache as far as ``match`` is concerned (door/kv_claims.py). Returns how many
        blocks it claimed."""
        return self._claims.hold(self._engine(name), hashes) if hashes and self.max_provisional else 0

    def expire(self) -> int:
        """End the provisional claims whose time-to-live has passed; returns how many."""
        return self._claims.expire()

    def provisional(self, engine: str | None = None) -> int:
        """Provisional claims (one engine's, or all) not yet confirmed or ended."""
        if engine is None:
            return self._claims.live
        known = self._engines.get(engine)
        return 0 if known is None else len(known.provisional)

    def stats(self) -> IndexStats:
        return IndexStats(
            engines=len(self._engines),
            entries=self._entries,
            blocks_by_medium={medium: len(holders) for medium, holders in self._holders.items()},
            ignored_blocks=self._ignored,
            unresolved_blocks=self._unresolved,
            evicted_entries=self._evicted,
            dropped_entries=self._dropped,
            provisional_entries=self._claims.live,
            confirmed_provisional=self._claims.confirmed,
            expired_provisional=self._claims.expired,
        )
