"""KV-aware routing: the engine with the least prompt left to compute and the shortest
queue first (pure, no I/O).

For one prompt, the door knows (``PromptCache``): its length, how many of its leading
blocks each engine holds in its device cache (``KVIndex.match``) and in a host offload
tier (``KVIndex.match(..., MEDIUM_CPU)``), and how many the data system holds
(``KVIndex.store_match``, estimated from the same events; every engine that reuses
prefixes can load them). Each candidate's score, in prompt tokens:

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
in order. Cost: one score per distinct device-hit count, then one multiply-add per
candidate and a C-level sort (about 40 us for 256 candidates on the 2-core box).

``order(candidates, affinity_key)`` (the ``Policy`` interface, for a request whose token
ids the door does not have) falls back to least outstanding, then the rotation.
"""

from __future__ import annotations

import zlib
from operator import attrgetter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controller.policies import EngineLoad

STORE_LOAD_COST = 0.05  # ttft_tiers: 4096 tokens loaded through another worker, per token, / compute per token
HOST_LOAD_COST = 0.02  # assumed: between the device (0) and the data system
REQUEST_COST_TOKENS = 256.0
_OUTSTANDING = attrgetter("outstanding")


@dataclass(frozen=True)
class PromptCache:
    """What the door knows about one prompt's blocks."""

    num_tokens: int
    block_size: int
    device_blocks: Mapping[str, int] = field(default_factory=dict)  # engine -> leading blocks in its device cache
    host_blocks: Mapping[str, int] = field(default_factory=dict)  # engine -> leading blocks in its host offload tier
    store_blocks: int = 0  # leading blocks in the data system
    key: int = 0  # affinity for ties: e.g. the first block's chained hash


@dataclass
class KVAware:
    store_load_cost: float = STORE_LOAD_COST
    host_load_cost: float = HOST_LOAD_COST
    request_cost_tokens: float = REQUEST_COST_TOKENS
    store_reuse: bool = True  # False: the candidates do not load prefixes from the data system

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
        # The common case, made cheap for hundreds of candidates: one score per distinct
        # device count, and the key computed by sorted itself (no index list to map back).
        device = cache.device_blocks
        saved = {held: self._saved(held, 0, cache) for held in {0, *device.values()}}
        held_by = device.get
        return sorted(rotated, key=lambda engine: engine.outstanding * cost - saved[held_by(engine.name, 0)])

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
    engines = list(candidates)
    start = key % len(engines) if engines else 0
    return engines[start:] + engines[:start]


