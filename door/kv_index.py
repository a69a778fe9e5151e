"""Which engine holds which prompt blocks: an index fed by vLLM's KV cache events.

vLLM names a block by its own hash (sha256 over the parent's hash, the block's token
ids and extra keys, seeded by the engine), which the door cannot compute from a request
cheaply. The index therefore names blocks by a **chained token hash** it computes both
from events (``BlockStored`` carries the blocks' token ids and the engine hash of the
block before them) and from a request's token ids:

    chain(-1) = ROOT
    chain(i)  = hash((chain(i-1), tuple(token_ids[i*B:(i+1)*B]), extra(i)))

with B the engines' block size and ``extra(i)`` what vLLM publishes as the block's extra
keys (``BlockStored.extra_keys[i]``, lists made tuples): None for a plain block; for a
LoRA request the adapter's name on every block; ``cache_salt`` on the first block after
the LoRA name; multimodal ``(identifier, offset)`` pairs, which the door cannot compute,
so multimodal prompts match only their blocks before the first image. Only full blocks
are hashed, as vLLM does. Python's tuple hash (xxHash-style, 64-bit) costs ~25 us per
2K-token prompt where blake2b costs ~95 us; it is not collision resistant, which is
harmless here: a collision misroutes one request, the engine still checks its own
hashes. String extra keys make it process-local (PYTHONHASHSEED): each door process
keeps its own index.

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

``match`` walks the prompt's chained hashes once, ANDing each block's holders into the
engines still holding every block so far, and stops when none is left; it returns the
engines that drop out at each depth as bitmasks (``Held``: a mapping engine -> leading
blocks that looks names up only when asked), so a decision does no per-engine work
there (``KVAware`` ranks the few engines outside the largest group by name, the rest by
load). Measured (``benchmarks.kv_index_scale``, 256 engines, 1M entries, 2-core box):
about 0.2 us per block walked, nearly all of it the dict lookup's cache misses (13 us
for a 65-block walk, 26 us for 128); a ``dict`` of 256 names, as ``match`` returned
before, cost 10 us more.

Provisional holdings (``hold``): an engine's events come only after its scheduler step
computed the blocks (hundreds of ms for a long prompt on CPU), and until then requests
sharing the prompt's head would see nothing cached and be spread over engines that each
compute it. So the door, when it sends a prompt to the engine that will compute it,
records that engine as holding the prompt's full blocks in its device cache: its bit
is set in the device medium's holders, where ``match`` counts it as any device hit (no
cost added to the walk), and the engine's ``provisional`` dict names the chained hashes
held that way (chained hash -> the ``_Hold`` that last claimed it). A block the engine
holds by its events is not claimed (real and provisional are exclusive per engine and
block). What ends a claim:
- the engine's own ``BlockStored`` for the block (device medium): confirmed, from then
  on an ordinary entry (removals, the cap, drops);
- ``provisional_ttl_s`` passing (the request failed, was aborted, or the engine's blocks
  never come under the door's chained hashes): gone, checked lazily by ``match`` (one
  clock call when claims are live) and by ``expire`` (the door's once-a-second publish);
  a later request routed to the engine for the same block claims it again, anew;
- ``drop``/``remove`` of the engine (``AllBlocksCleared``, lost events, a restart);
- the cap: at most ``max_provisional`` claims (a block claimed again counts again until
  its earlier claim ends), the oldest ended first.
Claims are kept per routed prompt (``_Hold``, in a queue in deadline order: the TTL is one
setting and the clock monotonic), so expiring is a pop from the queue's front. Measured
(``benchmarks.kv_index_scale --in-flight 256``, 2-core box at load 2.8): ~120 bytes per
claim (the default cap, ~30 MiB); ``hold`` of a new 2048-token prompt 34 us p50 (two
dict writes per block); a decision 5 us slower at p50 with 160K claims live (a larger
holders dict, and holds between decisions evicting the caches).

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from door.kv_wire import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash

logger = logging.getLogger(__name__)

ROOT = 0x6B765F696E646578  # the chain's start ("kv_index")
_MASK64 = (1 << 64) - 1
DEFAULT_MAX_BLOCKS = 2_000_000
DEFAULT_PROVISIONAL_TTL_S = 10.0  # a routed prompt's blocks count as held this long without the engine's events
DEFAULT_MAX_PROVISIONAL = 250_000  # provisional claims (routed prompts' blocks not yet confirmed)
_BYTE_BITS = [tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256)]
_PEELED_BITS = 16  # Roster.names_of: up to this many, peeling beats walking a 256-bit mask's bytes


def chained_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: Sequence[Any] | None = None, parent: int = ROOT
) -> list[int]:
    """One chained hash per full block of ``token_ids`` (see the module docstring)."""
    hashes: list[int] = []
    tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
    end = len(tokens) - len(tokens) % block_size
    if extra_keys is None:
        for start in range(0, end, block_size):
            parent = hash((parent, tokens[start : start + block_size], None))
            hashes.append(parent)
        return hashes
    for index, start in enumerate(range(0, end, block_size)):
        extra = extra_keys[index] if index < len(extra_keys) else None
        parent = hash((parent, tokens[start : start + block_size], extra))
        hashes.append(parent)
    return hashes


def request_extra_keys(
    num_blocks: int, lora_name: str | None = None, cache_salt: str | None = None
) -> list[Any] | None:
    """A text request's per-block extra keys as vLLM publishes them (lora name on every
    block, then cache_salt on the first); None when there are none."""
    if not lora_name and not cache_salt:
        return None
    rest = (lora_name,) if lora_name else None
    first = tuple(key for key in (lora_name, cache_salt) if key)
    return [first] + [rest] * (num_blocks - 1) if num_blocks else []


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value


def _engine_hash(block_hash: ExternalBlockHash) -> int:
    if isinstance(block_hash, bytes):
        return int.from_bytes(block_hash[-8:], "big")
    return block_hash & _MASK64


class Roster:
    """Which engine has which id (bit ``1 << id`` in the masks), as of one moment: the index
    replaces it, never changes it, when an engine comes or goes, so a ``Held`` keeps
    naming the engines it was made with."""

    __slots__ = ("names", "ids")

    def __init__(self, names: Sequence[str | None] = ()) -> None:
        self.names: tuple[str | None, ...] = tuple(names)  # by engine id; None: a free id
        self.ids: dict[str, int] = {name: engine_id for engine_id, name in enumerate(self.names) if name is not None}

    def names_of(self, bits: int) -> list[str]:
        """The engines of the bitmask ``bits``, by id: a few peeled off one at a time, more a
        byte at a time (3x faster than peeling 100 bits off a 256-bit int, 4x slower for one)."""
        names = self.names
        found: list[str] = []
        if bits.bit_count() <= _PEELED_BITS:
            while bits:
                lowest = bits & -bits
                found.append(names[lowest.bit_length() - 1])  # type: ignore[arg-type]
                bits ^= lowest
            return found
        for byte_index, byte in enumerate(bits.to_bytes((bits.bit_length() + 7) // 8, "little")):
            if byte:
                base = byte_index * 8
                for offset in _BYTE_BITS[byte]:
                    found.append(names[base + offset])  # type: ignore[arg-type]
        return found

    def mask_of(self, names: Iterable[str]) -> int:
        """The bitmask of those of ``names`` the roster knows."""
        ids = self.ids
        mask = 0
        for name in names:
            engine_id = ids.get(name)
            if engine_id is not None:
                mask |= 1 << engine_id
        return mask

    def with_name(self, engine_id: int, name: str | None) -> Roster:
        """A roster with ``engine_id`` given to ``name`` (None: freed)."""
        names = list(self.names) + [None] * (engine_id + 1 - len(self.names))
        names[engine_id] = name
        return Roster(names)


class Held(Mapping[str, int]):
    """By engine, how many leading blocks of one prompt it holds in one medium (what
    ``KVIndex.match`` returns; engines holding none are absent). Kept as ``levels``:
    ``(blocks, engines)`` pairs, shallowest first, ``engines`` the bitmask of the engines
    that hold exactly ``blocks`` leading blocks (each engine in one level at most);
    names come from ``roster`` only when asked for."""

    __slots__ = ("levels", "roster")

    def __init__(self, levels: Sequence[tuple[int, int]], roster: Roster) -> None:
        self.levels = levels
        self.roster = roster

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> Held:
        """The same from a mapping engine -> leading blocks (counts of 0 or less: absent)."""
        if isinstance(counts, Held):
            return counts
        if not counts:
            return cls([], _NO_ENGINES)
        roster = Roster(list(counts))
        by_blocks: dict[int, int] = {}
        for name, blocks in counts.items():
            if blocks > 0:
                by_blocks[blocks] = by_blocks.get(blocks, 0) | 1 << roster.ids[name]
        return cls(sorted(by_blocks.items()), roster)

    def blocks_of(self, name: str) -> int:
        """``name``'s leading blocks, 0 if none (no exception: ``get`` for every candidate
        of a policy's key function stays cheap)."""
        engine_id = self.roster.ids.get(name)
        if engine_id is not None:
            bit = 1 << engine_id
            for blocks, engines in self.levels:
                if engines & bit:
                    return blocks
        return 0

    def __getitem__(self, name: str) -> int:
        blocks = self.blocks_of(name)
        if not blocks:
            raise KeyError(name)
        return blocks

    def get(self, name: str, default: Any = None) -> Any:
        return self.blocks_of(name) or default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.blocks_of(name) > 0

    def __iter__(self) -> Iterator[str]:
        for _, engines in self.levels:
            yield from self.roster.names_of(engines)

    def __len__(self) -> int:
        return sum(engines.bit_count() for _, engines in self.levels)

    def __repr__(self) -> str:
        return f"Held({dict(self)!r})"


_NO_ENGINES = Roster()


def _drop_outs(holders: dict[int, int], hashes: Iterable[int]) -> list[tuple[int, int]]:
    """``Held.levels`` of a prompt: walks its blocks, keeping the engines that hold every
    block so far (``alive``), until none does."""
    get = holders.get
    levels: list[tuple[int, int]] = []
    alive = -1  # every engine, before the first block
    held = 0
    for block_hash in hashes:
        still = alive & get(block_hash, 0)
        if still != alive:
            if held:
                levels.append((held, alive ^ still))
            if not still:
                return levels
            alive = still
        held += 1
    if held:
        levels.append((held, alive))
    return levels


def _unset(holders: dict[int, int], chain: int, bit: int) -> None:
    """Take one engine's ``bit`` off ``chain``'s holders (the entry goes with the last)."""
    mask = holders[chain] & ~bit
    if mask:
        holders[chain] = mask
    else:
        del holders[chain]


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
    provisional: dict[int, _Hold] = field(default_factory=dict)  # device chained hash -> the claim that holds it


class _Hold:
    """The blocks of one prompt that the door routed to ``engine`` and claimed for it
    (chained hashes) until ``deadline``; a block claimed again later belongs to the later
    claim (``engine.provisional`` names the owner)."""

    __slots__ = ("deadline", "engine", "chains")

    def __init__(self, deadline: float, engine: _Engine, chains: list[int]) -> None:
        self.deadline = deadline
        self.engine = engine
        self.chains = chains


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
        self._holds: deque[_Hold] = deque()  # provisional claims, oldest (earliest deadline) first
        self._claimed = 0  # chains over the queued holds (the cap's count)
        self._provisional = 0  # entries of the engines' provisional dicts
        self._confirmed = 0
        self._expired = 0

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
        holds = self._holds
        if holds and holds[0].deadline <= self._clock():
            self.expire()
        holders = self._holders.get(medium)
        return Held(_drop_outs(holders, hashes) if holders else [], self._roster)

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
        unclaimed = self._unclaim_all(engine)
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
        key = _engine_hash(parent)
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
            extra = None if extras is None or extras[index] is None else _hashable(extras[index])
            chain = hash((chain, tokens[index * size : (index + 1) * size], extra))
            if provisional and chain in provisional:  # claimed when routed: confirmed, the bit stays
                del provisional[chain]
                self._provisional -= 1
                self._confirmed += 1
            if in_store is not None:
                in_store.pop(chain, None)  # now the newest
                in_store[chain] = None
                if len(in_store) > self.max_blocks:
                    del in_store[next(iter(in_store))]
            key = _engine_hash(block_hash)
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
            key = _engine_hash(block_hash)
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
            _unset(tier.holders, chain, tier.bit)

    def _evict(self, tier: _Tier, count: int) -> int:
        """Forget ``tier``'s ``count`` oldest entries."""
        blocks = tier.blocks
        oldest = list(itertools.islice(blocks, count))  # one pass over the dict's front
        for key in oldest:
            chain = blocks.pop(key)
            tier.extra_refs.pop(key, None)
            _unset(tier.holders, chain, tier.bit)
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
        device cache as far as ``match`` is concerned (module docstring). Returns how many
        blocks it claimed (not those it holds by its events; those it held provisionally
        are claimed anew, until a new deadline)."""
        if not hashes or not self.max_provisional:
            return 0
        engine = self._engine(name)
        provisional, bit = engine.provisional, engine.bit
        holders = self._holders.setdefault(MEDIUM_GPU, {})
        get = holders.get
        chains: list[int] = []  # the blocks claimed: not held, or held provisionally (claimed anew)
        unheld = 0
        for chain in hashes:
            mask = get(chain, 0)
            if not mask & bit:
                holders[chain] = mask | bit
                unheld += 1
            elif chain not in provisional:
                continue  # held by its events
            chains.append(chain)
        if not chains:
            return 0
        claim = _Hold(self._clock() + self.provisional_ttl_s, engine, chains)
        provisional.update(dict.fromkeys(chains, claim))
        self._provisional += unheld
        self._holds.append(claim)
        self._claimed += len(chains)
        while self._claimed > self.max_provisional:
            self._expired += self._end(self._holds.popleft())
        return len(chains)

    def expire(self) -> int:
        """End the provisional claims whose time-to-live has passed; returns how many."""
        now = self._clock()
        holds = self._holds
        ended = 0
        while holds and holds[0].deadline <= now:
            ended += self._end(holds.popleft())
        self._expired += ended
        return ended

    def provisional(self, engine: str | None = None) -> int:
        """Provisional claims (one engine's, or all) not yet confirmed or ended."""
        if engine is None:
            return self._provisional
        known = self._engines.get(engine)
        return 0 if known is None else len(known.provisional)

    def _end(self, claim: _Hold) -> int:
        """End those of a dequeued claim's blocks it still holds (not confirmed, dropped or
        claimed again since); returns how many."""
        self._claimed -= len(claim.chains)
        provisional, bit = claim.engine.provisional, claim.engine.bit
        holders = self._holders[MEDIUM_GPU]
        ended = 0
        for chain in claim.chains:
            if provisional.get(chain) is claim:
                del provisional[chain]
                _unset(holders, chain, bit)
                ended += 1
        self._provisional -= ended
        return ended

    def _unclaim_all(self, engine: _Engine) -> int:
        """End all of ``engine``'s provisional claims (their queued ``_Hold``s end nothing
        when their turn comes); returns how many."""
        provisional = engine.provisional
        holders = self._holders.get(MEDIUM_GPU, {})
        for chain in provisional:
            _unset(holders, chain, engine.bit)
        count = len(provisional)
        provisional.clear()
        self._provisional -= count
        return count

    def stats(self) -> IndexStats:
        return IndexStats(
            engines=len(self._engines),
            entries=self._entries,
            blocks_by_medium={medium: len(holders) for medium, holders in self._holders.items()},
            ignored_blocks=self._ignored,
            unresolved_blocks=self._unresolved,
            evicted_entries=self._evicted,
            dropped_entries=self._dropped,
            provisional_entries=self._provisional,
            confirmed_provisional=self._confirmed,
            expired_provisional=self._expired,
        )
