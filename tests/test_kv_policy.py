"""The KV-aware policy on constructed states: exact orders."""

from __future__ import annotations

import pytest

from door.kv_holders import Held
from door.kv_policy import KVAware, PromptCache, _rotated
from door.policies import EngineLoad


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


def named(**outstanding: int) -> list[EngineLoad]:
    return [EngineLoad(name=name, url="", role="decode", outstanding=load) for name, load in outstanding.items()]


def test_only_the_candidates_outside_the_largest_group_are_scored_by_name() -> None:
    policy = KVAware(request_cost_tokens=256)
    # a, b, c hold 4 blocks (64 tokens), d 10 (160); p (a prefill engine, not a candidate)
    # holds 20; x is unknown to the index: it saves nothing, not the common 64
    held = Held.of({"a": 4, "b": 4, "c": 4, "d": 10, "p": 20})
    state = cache(device_blocks=held)
    candidates = named(x=0, a=0, b=1, c=0, d=2)
    among = policy._candidates(candidates, held.roster)
    assert (among.known, among.unknown) == (0b01111, ("x",))
    assert policy._device_scores(held, among, state) == (64.0, {"d": 160.0, "x": 0.0})
    # scores: x 0, a -64, b 256-64, c -64, d 512-160
    assert names(policy.order_cached(candidates, state)) == ["a", "c", "x", "b", "d"]
    # most candidates hold nothing: those with hits are the named ones
    held = Held.of({"a": 4})
    among = policy._candidates(candidates, held.roster)
    assert policy._device_scores(held, among, cache(device_blocks=held)) == (0.0, {"a": 64.0})
    # all hold the same: no names, the order is by load
    held = Held.of({name: 4 for name in "xabcd"})
    state = cache(device_blocks=held)
    assert policy._device_scores(held, policy._candidates(candidates, held.roster), state) == (64.0, {})
    assert names(policy.order_cached(candidates, state)) == ["x", "a", "c", "b", "d"]
    assert names(KVAware(request_cost_tokens=0).order_cached(candidates, state)) == ["x", "a", "b", "c", "d"]


def test_candidate_lists_are_remembered_per_roster() -> None:
    policy = KVAware()
    held = Held.of({"a": 4, "c": 2})
    state = cache(device_blocks=held)
    candidates = named(a=0, b=0, c=0)

    def seen() -> list[tuple[list[str], int, tuple[str, ...]]]:
        return [(names(entry.engines), entry.known, entry.unknown) for entry in policy._seen]

    policy.order_cached(candidates, state)
    policy.order_cached(list(candidates), state)  # a new list of the same engines
    policy.order_cached(tuple(candidates), state)
    assert seen() == [(["a", "b", "c"], 0b11, ("b",))]
    policy.order_cached(candidates[:2], state)
    policy.order_cached([*candidates[:2], EngineLoad(name="c", url="", role="decode", outstanding=1)], state)
    assert seen() == [(["a", "b", "c"], 0b11, ("b",)), (["a", "b"], 0b01, ("b",)), (["a", "b", "c"], 0b11, ("b",))]
    other = Held.of({"c": 1})  # another roster: c has id 0 there
    assert names(policy.order_cached(candidates, cache(device_blocks=other))) == ["c", "a", "b"]
    policy.order_cached(candidates[1:], state)
    assert seen() == [(["b", "c"], 0b10, ("b",)), (["a", "b", "c"], 0b1, ("a", "b")),
                      (["a", "b", "c"], 0b11, ("b",)), (["a", "b"], 0b01, ("b",))]  # fmt: skip


def test_the_order_is_the_score_order_of_every_candidate() -> None:
    """Against the plain definition (each candidate's score, then a stable sort of the
    rotation), over hits that tie with loads, unknown candidates, and other roles'
    engines in the index."""
    loads = {"a": 0, "b": 1, "c": 0, "d": 2, "e": 1, "f": 0, "g": 3}
    hits = [{}, {"a": 4}, {"c": 16, "e": 16}, {name: 1 for name in "abcdefgpq"}, {"a": 1, "b": 17, "c": 33, "p": 40},
            {"b": 2, "d": 2, "f": 2, "g": 9}, {name: 1 + number % 3 for number, name in enumerate("abcdefg")}]
    checked = 0
    for cost in (0.0, 16.0, 256.0):
        policy = KVAware(request_cost_tokens=cost)
        for device in hits:
            for store_blocks in (0, 8):
                for key in range(4):
                    state = cache(num_tokens=520, key=key, device_blocks=Held.of(device), store_blocks=store_blocks)
                    candidates = named(**loads)
                    expected = sorted(_rotated(candidates, key), key=lambda engine: engine.outstanding * cost
                                      - policy.saved_tokens(engine.name, state))  # fmt: skip
                    assert names(policy.order_cached(candidates, state)) == names(expected)
                    checked += 1
    assert checked == 168


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
