"""A continuous-batching scheduler with chunked prefill, as vLLM V1 schedules, spending
each step's time as the cost profile says.

Each step: the running requests first, in order (a decode takes one token, a prefill its
next chunk), then waiting ones in arrival order while the step's token budget
(``max_num_batched_tokens``), ``max_num_seqs`` and free blocks allow; a waiting request
starts from its prefix cache hit (full blocks, never its last token) and from what a
prefill engine handed over. A running request that needs a block when none is free
preempts the request admitted last (its blocks freed, its tokens computed again later,
vLLM's recompute preemption). The step then sleeps its cost; its requests advance, those
whose tokens are all computed sample one token (pseudo-random, the same for the same
prompt), named blocks are announced, finished requests free their blocks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.kv_wire import KVEvent
from workers.sim_engine.kv_cache import Allocation, SimKVCache, request_block_extras
from workers.sim_engine.metrics import TTFT_BUCKETS, Histogram
from workers.sim_engine.profile import CostProfile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int


@dataclass
class SimRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    cache_salt: str | None = None
    handed_over: int = 0  # prompt tokens a prefill engine computed for it (PD decode leg)
    sample_seed: int = 0
    arrived: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(init=False)
    computed: int = 0
    cached_tokens: int = 0  # found in the prefix cache when admitted
    external_tokens: int = 0  # loaded from the prefill engine's handoff
    allocation: Allocation = field(default_factory=Allocation)
    output: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)  # token ids, then None
    finished: bool = False
    preemptions: int = 0
    first_token_at: float | None = None
    _hashes: list[int] | None = field(default=None, repr=False)
    _rng: random.Random | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    def prompt_hashes(self, cache: SimKVCache) -> list[int]:
        """The names of the prompt's full blocks, computed once (the server's handoff check and the scheduler share them)."""
        if self._hashes is None:
            self._hashes = cache.prompt_hashes(self.prompt, self.extras)
        return self._hashes

    @property
    def extras(self) -> list[Any]:
        return request_block_extras(self.cache_salt)


class SimScheduler:
    def __init__(self, cache: SimKVCache, profile: CostProfile, limits: SchedulerLimits, vocab: Callable[[random.Random], int],
                 publish: Callable[[list[KVEvent]], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:  # fmt: skip
        """``on_failure``: called if the step loop fails (the server ends the engine then)."""
        self.cache = cache
        self.profile = profile
        self.limits = limits
        self._sample = vocab
        self._publish = publish
        self._on_failure = on_failure
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Counters for /metrics
        self.prompt_tokens_by_source = {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}
        self.generation_tokens = 0
        self.finished_requests = 0
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0
        self.late_s = 0.0  # how far steps ran past their cost: the host's cores were busy elsewhere
        self.ttft = Histogram(TTFT_BUCKETS)

    def start(self) -> None:
        self._wake = asyncio.Event()  # of this loop
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-scheduler")
        self._task.add_done_callback(self._failed)

    def _failed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.critical("the simulated scheduler failed", exc_info=task.exception())
            if self._on_failure is not None:
                self._on_failure(task.exception())  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def add(self, request: SimRequest) -> None:
        self.waiting.append(request)
        self._wake.set()

    def abort(self, request: SimRequest) -> None:
        """The client went away: the request leaves the scheduler and frees its blocks."""
        if request.finished:
            return
        request.finished = True
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.allocation)

    async def _loop(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            started = time.monotonic()
            batch = self._schedule()
            if not batch:  # nothing fits (every block held): wait for a finish or an abort
                self._wake.clear()
                await asyncio.sleep(0.001)
                continue
            tokens = sum(n for _, n in batch)
            decoding = [request.computed + 1 for request, n in batch if request.computed >= len(request.prompt)]
            pairs = sum(n * (request.computed + n / 2) for request, n in batch if request.computed < len(request.prompt))
            cost = self.profile.step_s(tokens, pairs, sum(decoding), len(batch))
            await asyncio.sleep(max(0.0, started + cost - time.monotonic()))
            self.steps += 1
            self.busy_s += cost
            self.late_s += max(0.0, time.monotonic() - started - cost)
            self._advance(batch)

    def _schedule(self) -> list[tuple[SimRequest, int]]:
        budget = self.limits.max_num_batched_tokens
        batch: list[tuple[SimRequest, int]] = []
        preempted = False
        for request in list(self.running):
            if budget <= 0:
                break
            if request not in self.running:  # preempted in this pass
                continue
            count = min(len(request.tokens) - request.computed, budget)
            if count <= 0:
                continue
            while not self.cache.can_allocate(request.allocation, request.computed + count):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                self.cache.allocate(request.allocation, request.computed + count)
                batch.append((request, count))
                budget -= count
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            request = self.waiting[0]
            hit_hashes = self._hits(request)
            start = max(len(hit_hashes) * self.cache.block_size, request.external_tokens)
            count = min(len(request.tokens) - start, budget)
            if not self.cache.can_allocate(request.allocation, start + count, hit_hashes):
                break
            self.waiting.popleft()
            self.cache.allocate(request.allocation, start + count, hit_hashes)
            if request.preemptions == 0:
                self._count_prompt_sources(request, len(hit_hashes) * self.cache.block_size)
            request.computed = start
            self.running.append(request)
            batch.append((request, count))
            budget -= count
        return batch

    def _hits(self, request: SimRequest) -> list[int]:
        """The prefix cache blocks a waiting request starts from (at most its length less one token)."""
        hashes = request.prompt_hashes(self.cache) if request.generated == 0 else self.cache.prompt_hashes(request.tokens, request.extras)
        limit = (len(request.tokens) - 1) // self.cache.block_size
        return hashes[: self.cache.cached_blocks(hashes, limit)]

    def _count_prompt_sources(self, request: SimRequest, hit_tokens: int) -> None:
        prompt = len(request.prompt)
        external = max(0, request.external_tokens - hit_tokens)
        request.cached_tokens = hit_tokens
        self.cache.record_query(prompt, hit_tokens)
        self.prompt_tokens_by_source["local_cache_hit"] += hit_tokens
        self.prompt_tokens_by_source["external_kv_transfer"] += external
        self.prompt_tokens_by_source["local_compute"] += max(0, prompt - hit_tokens - external)

    def _preempt(self, request: SimRequest) -> None:
        self.running.remove(request)
        self.cache.free(request.allocation)
        request.computed = 0
        request.external_tokens = 0  # its loaded KV is gone with its blocks
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def _advance(self, batch: list[tuple[SimRequest, int]]) -> None:
        now = time.monotonic()
        for request, count in batch:
            if request.finished:  # aborted while the step ran
                continue
            request.computed += count
            self.cache.name_full_blocks(request.allocation, request.tokens, request.computed, request.extras)
            if request.computed < len(request.tokens):
                continue  # a prefill chunk: more to compute
            if request._rng is None:
                request._rng = random.Random(request.sample_seed)
            token = self._sample(request._rng)
            request.tokens.append(token)
            self.generation_tokens += 1
            if request.first_token_at is None:
                request.first_token_at = now
                self.ttft.observe(now - request.arrived)
            request.output.put_nowait(token)
            if request.generated >= request.max_tokens or len(request.tokens) >= self.limits.max_model_len:
                self._finish(request)
        if self._publish is not None:
            events = self.cache.drain_events()
            if events:
                self._publish(events)

    def _finish(self, request: SimRequest) -> None:
        request.finished = True
        self.running.remove(request)
        self.cache.free(request.allocation)
        self.finished_requests += 1
        request.output.put_nowait(None)

