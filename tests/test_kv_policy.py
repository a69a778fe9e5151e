"""The KV-aware policy on constructed states: exact orders."""

from __future__ import annotations

import pytest

from controller.kv_policy import KVAware, PromptCache
from controller.policies import EngineLoad


def engines(*outstanding: int) -> list[EngineLoad]:
    return [EngineLoad(name=name, url="", role="prefill", outstanding=load) for name, load in zip("abcd", outstanding)]


def names(order: list[EngineLoad]) -> list[str]:
    return [engine.name for engine in order]


def cache(num_tokens: int = 1000, key: int = 0, **fields: object) -> PromptCache:
    return PromptCache(num_tokens=num_tokens, block_size=16, key=key, **fields)  # type: ignore[arg-type]


def test_a_device_hit_beats_a_store_hit_beats_none() -> None:
    policy = KVAware(store_load_cost=0.05)
    # b: 40 device blocks = 640 tokens; every engine can load 20 from the store: 20*16*0.95 = 304
    state = cache(device_blocks={"b": 40}, store_blocks=20)
    assert names(policy.order_cached(engines(0, 0, 0), state)) == ["b", "a", "c"]
    assert policy.saved_tokens("b", state) == 640 and policy.saved_tokens("a", state) == 304
    # one device block beats nothing
    assert names(policy.order_cached(engines(0, 0, 0), cache(device_blocks={"c": 1}))) == ["c", "a", "b"]


def test_the_store_extends_a_shorter_device_hit_at_its_load_cost() -> None:
    policy = KVAware(store_load_cost=0.05)
    # a: 10 device blocks + 20 more from the store = 160 + 304 = 464; b: 30 from the store = 456
    state = cache(device_blocks={"a": 10}, store_blocks=30)
    assert names(policy.order_cached(engines(0, 0), state)) == ["a", "b"]
    assert policy.saved_tokens("a", state) == pytest.approx(464)
    # a dearer store (0.5): a = 160 + 160 = 320, b = 240
    assert names(KVAware(store_load_cost=0.5).order_cached(engines(0, 0), state)) == ["a", "b"]
    # without prefix reuse the store counts for nothing: a's device hit alone
    assert KVAware(store_reuse=False).saved_tokens("b", state) == 0


def test_the_host_tier_sits_between_the_device_and_the_store() -> None:
    policy = KVAware(store_load_cost=0.05, host_load_cost=0.02)
    # a: 160 device + 10 store blocks (152) = 312; b: 30 host blocks = 470.4; c: 20 store blocks = 304
    state = cache(device_blocks={"a": 10}, host_blocks={"b": 30}, store_blocks=20)
    assert names(policy.order_cached(engines(0, 0, 0), state)) == ["b", "a", "c"]
    assert policy.saved_tokens("b", state) == pytest.approx(470.4)


def test_the_load_penalty_outweighs_a_hit_past_its_price() -> None:
    policy = KVAware(request_cost_tokens=256)
    state = cache(device_blocks={"a": 40})  # 640 tokens
    # a with 3 in flight: 640 - 768 < 0; b and c idle: 0
    assert names(policy.order_cached(engines(3, 0, 0), state)) == ["b", "c", "a"]
    # a with 2 in flight: 640 - 512 > 0
    assert names(policy.order_cached(engines(2, 0, 0), state)) == ["a", "b", "c"]
    # no hits anywhere: least loaded first
    assert names(policy.order_cached(engines(2, 1, 3, 0), cache())) == ["d", "b", "a", "c"]


def test_vllm_computes_the_last_token_so_a_full_hit_is_one_block_short() -> None:
    policy = KVAware()
    state = cache(num_tokens=64, device_blocks={"a": 4, "b": 3})  # 4 blocks; at most 3 can be reused
    assert policy.saved_tokens("a", state) == policy.saved_tokens("b", state) == 48
    assert names(policy.order_cached(engines(0, 0), state)) == ["a", "b"]  # equal: the rotation from key 0


def test_equal_scores_keep_a_rotation_that_starts_at_the_prompts_key() -> None:
    policy = KVAware()
    candidates = engines(0, 0, 0, 0)
    assert names(policy.order_cached(candidates, cache(key=0))) == ["a", "b", "c", "d"]
    assert names(policy.order_cached(candidates, cache(key=6))) == ["c", "d", "a", "b"]
    assert names(policy.order_cached(candidates, cache(key=-1))) == ["d", "a", "b", "c"]
    assert names(policy.order_cached(candidates, cache(key=6, device_blocks={"a": 2}))) == ["a", "c", "d", "b"]
    assert policy.order_cached([], cache()) == []


def test_without_token_ids_it_orders_by_load() -> None:
    policy = KVAware()
    assert names(policy.order(engines(2, 0, 1), b"prompt head")) == ["b", "c", "a"]
    same = policy.order(engines(0, 0, 0), b"prompt head")
    assert sorted(names(same)) == ["a", "b", "c"] and same == policy.order(engines(0, 0, 0), b"prompt head")
    assert policy.order([], b"") == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="store_load_cost=1.5"):
        KVAware(store_load_cost=1.5)
    with pytest.raises(ValueError, match="request_cost_tokens=-1"):
        KVAware(request_cost_tokens=-1)
