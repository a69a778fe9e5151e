"""The simulated engine's parts: its KV cache (prefix hits, eviction, vLLM's events as
the door's index reads them), its scheduler (time as the profile says, chunked prefill,
preemption) and its cost profiles."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from benchmarks.calibrate import Observation, decode_features, fit, prefill_features
from common.kv_wire import BlockRemoved, BlockStored, KVEventBatch, decode_batch, encode_batch
from door.kv_index import KVIndex
from workers.sim_engine.kv_cache import Allocation, SimKVCache
from workers.sim_engine.metrics import render_metrics
from workers.sim_engine.profile import CostProfile, load_profile, shipped_profiles
from workers.sim_engine.scheduler import SchedulerLimits, SimRequest, SimScheduler

BLOCK = 4


def _profile(**costs: float) -> CostProfile:
    values = {"base_s": 0.0, "per_token_s": 0.0, "per_attention_s": 0.0, "per_context_s": 0.0, "per_sequence_s": 0.0,
              "request_overhead_s": 0.0, "load_base_s": 0.0, "load_per_token_s": 0.0, **costs}  # fmt: skip
    return CostProfile(name="test", source="test", **values)


def _fill(cache: SimKVCache, tokens: list[int], salt: str | None = None) -> Allocation:
    """A request that computed ``tokens`` and ended."""
    allocation = Allocation()
    extras = [(salt,)] if salt else []
    hashes = cache.prompt_hashes(tokens, extras)
    hits = hashes[: cache.cached_blocks(hashes, len(hashes))]
    cache.allocate(allocation, len(tokens), hits)
    cache.name_full_blocks(allocation, tokens, len(tokens), extras)
    cache.free(allocation)
    return allocation


def test_a_computed_prefix_is_found_again_and_announced_once() -> None:
    cache = SimKVCache(num_blocks=8, block_size=BLOCK)
    prompt = list(range(10))  # 2 full blocks and 2 tokens
    _fill(cache, prompt)
    (stored,) = cache.drain_events()
    assert isinstance(stored, BlockStored)
    assert (stored.token_ids, stored.parent_block_hash, stored.block_size) == (prompt[:8], None, BLOCK)
    assert cache.cached_blocks(cache.prompt_hashes(prompt + [99], []), 3) == 2
    assert cache.cached_blocks(cache.prompt_hashes([0, 1, 2, 3, 9, 9, 9, 9], []), 2) == 1  # second block differs
    _fill(cache, prompt)  # the same prompt again: its blocks are reused, nothing new announced
    assert cache.drain_events() == []


def test_a_salted_prompt_is_another_prompt() -> None:
    cache = SimKVCache(num_blocks=8, block_size=BLOCK)
    _fill(cache, list(range(8)), salt="a")
    assert cache.cached_blocks(cache.prompt_hashes(list(range(8)), []), 2) == 0
    assert cache.cached_blocks(cache.prompt_hashes(list(range(8)), [("a",)]), 2) == 2


def test_a_full_cache_evicts_the_least_recently_freed_blocks() -> None:
    cache = SimKVCache(num_blocks=4, block_size=BLOCK)
    first, second, third = list(range(8)), list(range(100, 108)), list(range(200, 208))
    _fill(cache, first)
    _fill(cache, second)
    cache.drain_events()
    _fill(cache, third)  # needs 2 blocks: the first prompt's go
    removed = [e for e in cache.drain_events() if isinstance(e, BlockRemoved)]
    assert sorted(h for e in removed for h in e.block_hashes) == sorted(cache.prompt_hashes(first, []))
    assert cache.cached_blocks(cache.prompt_hashes(second, []), 2) == 2
    assert cache.cached_blocks(cache.prompt_hashes(first, []), 2) == 0


def test_the_doors_index_follows_the_simulated_engines_events() -> None:
    """What the door's KV index makes of the events (through the wire) is what the cache holds."""
    cache = SimKVCache(num_blocks=4, block_size=BLOCK)
    index = KVIndex(block_size=BLOCK)
    prompts = [list(range(8)), list(range(100, 108)), list(range(200, 208))]
    for prompt in prompts:
        _fill(cache, prompt)
        index.apply("sim-0", decode_batch(encode_batch(KVEventBatch(ts=time.time(), events=cache.drain_events()))).events)
    assert [index.match(index.hashes(p)).get("sim-0", 0) for p in prompts] == [0, 2, 2]
    salted = list(range(300, 308))
    _fill(cache, salted, salt="s")
    index.apply("sim-0", cache.drain_events())
    assert index.match(index.hashes(salted, cache_salt="s")).get("sim-0", 0) == 2
    assert index.match(index.hashes(salted)).get("sim-0", 0) == 0


def _run(scheduler: SimScheduler, requests: list[SimRequest]) -> list[list[int]]:
    async def go() -> list[list[int]]:
        scheduler.start()
        for request in requests:
            scheduler.add(request)
        outputs: list[list[int]] = []
        for request in requests:
            tokens = []
            while (token := await request.output.get()) is not None:
                tokens.append(token)
            outputs.append(tokens)
        await scheduler.close()
        return outputs

    return asyncio.run(go())


def _scheduler(profile: CostProfile, blocks: int = 64, budget: int = 16, seqs: int = 8) -> SimScheduler:
    return SimScheduler(SimKVCache(blocks, BLOCK), profile, SchedulerLimits(budget, seqs, 1000),
                        lambda rng: rng.randrange(10, 50))  # fmt: skip


def test_a_request_takes_the_steps_the_profile_says() -> None:
    """40 prompt tokens at 16 a step: 3 prefill steps (16, 16, 8), then 4 decode steps."""
    scheduler = _scheduler(_profile(base_s=0.01, per_token_s=0.001))
    started = time.monotonic()
    [tokens] = _run(scheduler, [SimRequest("r", list(range(40)), max_tokens=5)])
    elapsed = time.monotonic() - started
    assert len(tokens) == 5
    assert scheduler.steps == 7
    expected = 7 * 0.01 + (40 + 4) * 0.001
    assert scheduler.busy_s == pytest.approx(expected)
    assert elapsed >= expected  # it slept at least what the profile says (busy_s: exactly that)


def test_steps_that_run_past_their_cost_are_counted_late() -> None:
    """The host's cores busy elsewhere (here: the loop blocked 0.3 s in one step) make the
    steps late, and the figures are then the host's: ``vllm:sim_late_seconds_total``."""
    scheduler = _scheduler(_profile(base_s=0.01, per_token_s=0.0))

    async def go() -> None:
        scheduler.start()
        request = SimRequest("r", list(range(8)), max_tokens=20)
        scheduler.add(request)
        await request.output.get()  # the first token: steps are running
        time.sleep(0.3)  # the loop held, as a busy host holds it
        while await request.output.get() is not None:
            pass
        await scheduler.close()

    asyncio.run(go())
    assert 0.28 <= scheduler.late_s <= 0.28 + 0.01 * scheduler.steps  # the hold, less the step it fell in
    assert "vllm:sim_late_seconds_total" in render_metrics(scheduler, scheduler.cache, "m")


def test_the_same_prompt_gives_the_same_tokens_and_hits_the_prefix_cache() -> None:
    scheduler = _scheduler(_profile())
    prompt = list(range(20))
    first = _run(scheduler, [SimRequest("a", prompt, max_tokens=4, sample_seed=7)])
    second = _run(scheduler, [SimRequest("b", prompt, max_tokens=4, sample_seed=7)])
    assert first == second
    assert scheduler.prompt_tokens_by_source == {"local_compute": 20 + 4, "local_cache_hit": 16, "external_kv_transfer": 0}


def test_a_handed_over_prompt_is_not_computed() -> None:
    scheduler = _scheduler(_profile(per_token_s=0.001))
    request = SimRequest("d", list(range(40)), max_tokens=2, handed_over=40)
    request.external_tokens = 39  # the server's submit sets this after the load's wait
    _run(scheduler, [request])
    assert scheduler.prompt_tokens_by_source == {"local_compute": 1, "local_cache_hit": 0, "external_kv_transfer": 39}
    assert scheduler.busy_s == pytest.approx((1 + 1) * 0.001)  # the last prompt token, then one decode


def test_requests_beyond_the_cache_are_preempted_and_still_finish() -> None:
    """4 blocks of 4 tokens: two requests growing to 3 blocks each cannot both stay."""
    scheduler = _scheduler(_profile(), blocks=4, budget=32)
    outputs = _run(scheduler, [SimRequest(str(i), list(range(i * 100, i * 100 + 6)), max_tokens=6) for i in range(2)])
    assert [len(o) for o in outputs] == [6, 6]
    assert scheduler.preemptions == 1
    assert scheduler.cache.free_blocks == 4


def test_the_shipped_profiles_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    assert "cpu-93m-float32" in shipped_profiles()
    for name in shipped_profiles():
        assert load_profile(name).name == name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "source": "y", "base_s": -1}))
    with pytest.raises(ValueError, match="lacks"):
        load_profile(str(bad))
    with pytest.raises(ValueError, match="no simulated engine profile 'nope'"):
        load_profile("nope")


def test_the_fit_recovers_known_coefficients() -> None:
    truth = _profile(base_s=0.02, per_token_s=0.004, per_attention_s=0.0002, per_context_s=0.003, per_sequence_s=0.001,
                     request_overhead_s=0.01)
    rng = random.Random(0)
    observations = []
    for length in (64, 256, 1024, 2048):
        features = prefill_features(length, 0)
        seconds = truth.step_s(length, length * length / 2, 0, 1) + truth.request_overhead_s
        observations.append(Observation("p", seconds * rng.uniform(0.99, 1.01), features))
    for batch, context in ((1, 256), (4, 256), (16, 256), (4, 1024), (8, 1024)):
        seconds = truth.step_s(batch, 0, batch * (context + 1), batch)
        observations.append(Observation("d", seconds * rng.uniform(0.99, 1.01), decode_features(batch, context)))
    base, per_token, attention, context, sequence, overhead = fit(observations)
    assert per_token == pytest.approx(0.004, rel=0.1)
    assert base + overhead == pytest.approx(0.03, rel=0.2)
    assert context == pytest.approx(0.003, rel=0.3)


@pytest.mark.parametrize("blocks", [341, 40])
def test_many_requests_sharing_heads_all_finish_and_free_every_block(blocks: int) -> None:
    """Seed 000's shape (4 heads of 1400 tokens, 280 of their own) arriving at random, in a
    roomy cache and in one so small that requests are preempted (a request growing past
    its prefix hit once lost its blocks' names: the scheduler died and every request hung)."""
    rng = random.Random(1)
    scheduler = SimScheduler(SimKVCache(blocks, 128), _profile(base_s=0.0001), SchedulerLimits(2048, 128, 4096),
                             lambda r: r.randrange(10, 4000))  # fmt: skip
    heads = [[rng.randrange(10, 4000) for _ in range(1400)] for _ in range(4)]

    async def go() -> int:
        scheduler.start()

        async def one(index: int) -> int:
            await asyncio.sleep(rng.random() * 0.05)
            request = SimRequest(str(index), heads[index % 4] + [rng.randrange(10, 4000) for _ in range(280)], max_tokens=3)
            scheduler.add(request)
            count = 0
            while await request.output.get() is not None:
                count += 1
            return count

        counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(100))), 30)
        await scheduler.close()
        return sum(counts)

    assert asyncio.run(go()) == 300
    assert scheduler.cache.free_blocks == blocks


def test_metrics_use_vllms_names_and_count_exactly() -> None:
    from prometheus_client.parser import text_string_to_metric_families


    scheduler = _scheduler(_profile())
    prompt = list(range(20))
    _run(scheduler, [SimRequest("a", prompt, max_tokens=3)])
    _run(scheduler, [SimRequest("b", prompt, max_tokens=2)])
    samples = {(s.name, s.labels.get("source", "")): s.value
               for family in text_string_to_metric_families(render_metrics(scheduler, scheduler.cache, "m"))
               for s in family.samples}  # fmt: skip
    assert samples[("vllm:generation_tokens_total", "")] == 5
    assert samples[("vllm:request_success_total", "")] == 2
    assert samples[("vllm:prompt_tokens_by_source_total", "local_cache_hit")] == 16
    assert samples[("vllm:prefix_cache_queries_total", "")] == 40
    assert samples[("vllm:time_to_first_token_seconds_count", "")] == 2
    assert samples[("vllm:num_requests_running", "")] == 0
