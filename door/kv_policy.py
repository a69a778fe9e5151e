"""KV-aware routing: the engine with the least prompt left to compute and the shortest
queue first (pure, no I/O).

For one prompt, the door knows (``PromptCache``): its length, how many of its leading
blocks each engine holds in its device cache (``KVIndex.match``: by its events, or
provisionally, a prompt the door sent it whose events have not come yet; both count
alike here) and in a host offload tier (``KVIndex.match(..., MEDIUM_CPU)``), and how
many the data system holds (``KVIndex.store_match``, estimated from the same events;
every engine that reuses prefixes can load them). Each candidate's score, in prompt
tokens:

    saved = device*B + max(host - device, 0)*B*(1 - host_load_cost)
            + max(store - max(device, host), 0)*B*(1 - store_load_cost)
    score = saved - outstanding * request_cost_tokens

with every block count capped at (prompt tokens - 1) // B, because vLLM always computes
the prompt's last token itself (so ``saved`` is what the engine will report as cached).
``store_load_cost`` is what loading a token from the data system costs relative to
computing it (measured by ``benchmarks.ttft_tiers``: 4096-token prompt on the CPU
backend, 2.17 ms/token to compute, 0.005 ms/token loaded through the same worker, 0.10
through another: 0.002-0.05; 0.05 by default); ``host_load_cost`` is the same for the
host tier (not measured; 0.02). ``request_cost_tokens`` prices one request already in
flight on the engine in prompt tokens of compute (to be tuned on the grouped-prefix
workload; 256 by default).

Order: score, best first; equal scores keep a rotation of the candidates that starts at
the prompt's affinity key (``PromptCache.key``, e.g. its first block's chained hash), so
a prompt nobody holds lands on the same engine each time, while the loads are equal,
and is cached there for the next one. All candidates are returned: the door tries them
in order.

Cost, for hundreds of candidates: the device hits come as groups of engines holding the
same number of blocks (``Held``, bitmasks over the index's engine ids; one score per
group). The largest group (often every engine: a shared system prompt, or none) is
never listed by name: only the other groups' engines are, and the sort looks each
candidate's name up among those few, the rest scoring the largest group's. Which
candidates the index knows is kept per candidate list (``_Candidates``: the door's
lists hold the same engines from one request to the next, so checking that a list is
unchanged is one C-level pass). With no other group the order is by load alone, a
sort on an attribute getter. Measured on the 2-core box, 256 candidates: 30 us with 16
outside the largest group, 22 of them the sort (a name lookup and a multiply-add per
candidate: merging the few into a by-load order costs as much, by ~1 us each), 10 us
by load alone. A prompt with host-tier hits (the door does not look them up today) is
scored candidate by candidate.

``order(candidates, affinity_key)`` (the ``Policy`` interface, for a request whose token
ids the door does not have) falls back to least outstanding, then the rotation.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from door.kv_holders import Held, Roster
from door.policies import EngineLoad

logger = logging.getLogger(__name__)

STORE_LOAD_COST = 0.05  # ttft_tiers: 4096 tokens loaded through another worker, per token, / compute per token
HOST_LOAD_COST = 0.02  # assumed: between the device (0) and the data system
REQUEST_COST_TOKENS = 256.0
_OUTSTANDING = attrgetter("outstanding")
_CANDIDATE_LISTS = 4  # candidate lists remembered (the door's roles: colocated, or prefill and decode)


@dataclass(frozen=True)
class PromptCache:
    """What the door knows about one prompt's blocks."""

    num_tokens: int
    block_size: int
    device_blocks: Mapping[str, int] = field(default_factory=dict)  # engine -> leading device blocks (match: a Held)
    host_blocks: Mapping[str, int] = field(default_factory=dict)  # engine -> leading blocks in its host offload tier
    store_blocks: int = 0  # leading blocks in the data system
    key: int = 0  # affinity for ties: e.g. the first block's chained hash


@dataclass(frozen=True, eq=False)
class _Candidates:
    """Which engines of one candidate list an index (as of ``roster``) knows."""

    engines: list[EngineLoad]  # the list as given, to tell whether the next one is the same
    roster: Roster
    known: int  # bitmask of the candidates the roster names
    unknown: tuple[str, ...]  # the names of the others (never hit)

    @classmethod
    def of(cls, candidates: Sequence[EngineLoad], roster: Roster) -> _Candidates:
        names = [engine.name for engine in candidates]
        unknown = tuple(name for name in names if name not in roster.ids)
        return cls(list(candidates), roster, roster.mask_of(names), unknown)

    def same(self, candidates: Sequence[EngineLoad], roster: Roster) -> bool:
        """Whether this describes ``candidates`` under ``roster`` (the list compares its
        items by identity first: the door's engines are the same objects each time)."""
        return roster is self.roster and self.engines == candidates


@dataclass
class KVAware:
    store_load_cost: float = STORE_LOAD_COST
    host_load_cost: float = HOST_LOAD_COST
    request_cost_tokens: float = REQUEST_COST_TOKENS
    store_reuse: bool = True  # False: the candidates do not load prefixes from the data system
    _seen: list[_Candidates] = field(default_factory=list, init=False, repr=False, compare=False)  # newest first

    def __post_init__(self) -> None:
        for name in ("store_load_cost", "host_load_cost"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: must be within 0-1 (a fraction of computing the token)")
        if self.request_cost_tokens < 0:
            raise ValueError(f"request_cost_tokens={self.request_cost_tokens}: must be >= 0")

    def order(self, candidates: Sequence[EngineLoad], affinity_key: bytes) -> list[EngineLoad]:
        """No token ids: least outstanding, ties rotated from the affinity key."""
        return sorted(_rotated(candidates, zlib.crc32(affinity_key)), key=_OUTSTANDING)

    def order_cached(self, candidates: Sequence[EngineLoad], cache: PromptCache) -> list[EngineLoad]:
        """Best first by saved prompt tokens less the load penalty (module docstring);
        equal scores keep the rotation's order (``sorted`` is stable)."""
        rotated = _rotated(candidates, cache.key)
        cost = self.request_cost_tokens
        if cache.host_blocks:
            saved_tokens = self.saved_tokens
            return sorted(rotated, key=lambda engine: engine.outstanding * cost - saved_tokens(engine.name, cache))
        held = Held.of(cache.device_blocks)
        common, saved_by_name = self._device_scores(held, self._candidates(candidates, held.roster), cache)
        if not saved_by_name:  # one saved count for all: by load, the scores' order (cost * load grows with load)
            if cost:
                rotated.sort(key=_OUTSTANDING)
            return rotated
        saved_of = saved_by_name.get
        rotated.sort(key=lambda engine: engine.outstanding * cost - saved_of(engine.name, common))
        return rotated

    def _device_scores(self, held: Held, among: _Candidates, cache: PromptCache) -> tuple[float, dict[str, float]]:
        """The saved tokens of the largest group of candidates with equal device hits, and
        by name those of the candidates outside it."""
        missed = self._saved(0, 0, cache)
        groups = {missed: among.known}  # saved tokens -> candidates (bitmask); all known missed so far
        for blocks, engines in held.levels:
            engines &= among.known
            if engines:
                saved = self._saved(blocks, 0, cache)
                groups[missed] &= ~engines
                groups[saved] = groups.get(saved, 0) | engines
        common, most = missed, -1
        for saved, engines in groups.items():
            size = engines.bit_count() + (len(among.unknown) if saved == missed else 0)
            if size > most:
                common, most = saved, size
        saved_by_name: dict[str, float] = {}
        for saved, engines in groups.items():
            if saved != common:
                saved_by_name.update(dict.fromkeys(held.roster.names_of(engines), saved))
        if missed != common:
            saved_by_name.update(dict.fromkeys(among.unknown, missed))
        return common, saved_by_name

    def _candidates(self, candidates: Sequence[EngineLoad], roster: Roster) -> _Candidates:
        """``_Candidates`` of this list, remembered for the next decisions."""
        if not isinstance(candidates, list):
            candidates = list(candidates)
        for seen in self._seen:
            if seen.same(candidates, roster):
                return seen
        fresh = _Candidates.of(candidates, roster)
        self._seen = [fresh, *self._seen[: _CANDIDATE_LISTS - 1]]
        logger.debug("KV policy: a new candidate list (%d engines, %d unknown to the index)",
                     len(candidates), len(fresh.unknown))  # fmt: skip
        return fresh

    def saved_tokens(self, engine: str, cache: PromptCache) -> float:
        """The prompt tokens ``engine`` would not compute (device hits count fully)."""
        return self._saved(cache.device_blocks.get(engine, 0), cache.host_blocks.get(engine, 0), cache)

    def _saved(self, device: int, host: int, cache: PromptCache) -> float:
        usable = max(cache.num_tokens - 1, 0) // cache.block_size
        device = min(device, usable)
        host = min(host, usable)
        store = min(cache.store_blocks, usable) if self.store_reuse else 0
        loaded = device
        saved = float(device)
        if host > loaded:
            saved += (host - loaded) * (1.0 - self.host_load_cost)
            loaded = host
        if store > loaded:
            saved += (store - loaded) * (1.0 - self.store_load_cost)
        return saved * cache.block_size


def _rotated(candidates: Sequence[EngineLoad], key: int) -> list[EngineLoad]:
    engines = candidates if isinstance(candidates, list) else list(candidates)
    start = key % len(engines) if engines else 0
    return engines[start:] + engines[:start]


