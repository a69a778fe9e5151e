"""The door's KV router: prompt token ids (given, text, chat), the order and the
selective-PD boundary on a constructed index, and following engines that come, restart
and go (with the real event subscriber)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from common.kv_wire import BlockStored
from deploy.embedded_model import ensure_embedded_model
from door.door_metrics import DoorMetrics
from door.kv_events import KVEventSubscriber
from door.kv_index import KVIndex
from door.kv_policy import KVAware
from door.kv_router import KVRouter, PromptTokenizer
from door.policies import EngineLoad
from testkit.helpers import PROJECT_ROOT, free_port

B = 16


def _stored(tokens: list[int]) -> BlockStored:
    hashes = [hashlib.sha256(repr(tokens[: (i + 1) * B]).encode()).digest() for i in range(len(tokens) // B)]
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=tokens, block_size=B)


def _engine(name: str, role: str = "decode", outstanding: int = 0, events_port: int = 0, restarts: int = 0) -> EngineLoad:
    return EngineLoad(name=name, url=f"http://{name}", role=role, outstanding=outstanding, host="127.0.0.1",
                      events_port=events_port, restarts=restarts)  # fmt: skip


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _router(selective_pd_tokens: int = 40, clock: _Clock | None = None, metrics: DoorMetrics | None = None) -> KVRouter:
    index = KVIndex(B, provisional_ttl_s=10.0, clock=clock or _Clock())
    return KVRouter(index, tokenize=lambda body: body.get("prompt"), selective_pd_tokens=selective_pd_tokens,
                    metrics=metrics)  # fmt: skip


def test_the_engine_holding_the_prompt_comes_first_and_decides_the_prefill_skip() -> None:
    router = _router(selective_pd_tokens=40)
    tokens = list(range(100, 100 + 6 * B + 10))  # 6 full blocks + 10 tokens
    router.index.apply("d1", [_stored(tokens[: 4 * B])])
    router.index.apply("d0", [_stored(tokens[: 6 * B])])
    prompt = router.prompt({"prompt": tokens})
    assert prompt is not None and prompt.tokens == 6 * B + 10
    d0, d1, d2 = _engine("d0"), _engine("d1"), _engine("d2")
    assert router.order([d2, d1, d0], prompt) == [d0, d1, d2]
    assert router.skip_prefill(d0, prompt)  # lacks 10 tokens
    assert not router.skip_prefill(d1, prompt)  # lacks 2 blocks + 10 = 42 tokens > 40
    assert not _router(selective_pd_tokens=0).skip_prefill(d0, prompt)  # off
    # a short prompt nobody holds is skipped too; a batch or an empty prompt has no token ids
    short = router.prompt({"prompt": list(range(40))})
    assert short is not None and router.skip_prefill(d2, short)
    assert router.prompt({"prompt": []}) is None


def test_in_an_adaptive_pool_only_an_idle_decode_engine_skips_the_prefill_leg() -> None:
    """Bench adaptive-ramp: every 256-token prompt skipped its prefill leg, so the split
    pool's decode engines computed all prompts (inter-token p50 157 ms with 12 streams)
    and the prefill engines idled."""
    router = _router(selective_pd_tokens=256)
    short = router.prompt({"prompt": list(range(1000, 1256))})
    assert short is not None
    idle, busy = _engine("d0"), _engine("d1", outstanding=1)
    assert router.skip_prefill(idle, short, only_idle=True)
    assert not router.skip_prefill(busy, short, only_idle=True)
    assert router.skip_prefill(busy, short)  # fixed roles: as before


def test_load_outweighs_a_small_cache_advantage() -> None:
    router = _router()
    tokens = list(range(3 * B + 1))
    router.index.apply("busy", [_stored(tokens[:B])])
    prompt = router.prompt({"prompt": tokens})
    assert prompt is not None
    busy, idle = _engine("busy", outstanding=1), _engine("idle")
    assert router.order([busy, idle], prompt) == [idle, busy]  # 16 cached tokens < 256 per request in flight


def test_a_prompt_keeps_its_holders_while_the_index_changes() -> None:
    """The door orders a PD request's decode engines again after its prefill leg: by what
    the index said when the request came, even if engines left and came since."""
    router = _router()
    tokens = list(range(4 * B + 1))
    router.index.apply("d0", [_stored(tokens[: 4 * B])])
    router.index.apply("d1", [_stored(tokens[:B])])
    prompt = router.prompt({"prompt": tokens})
    assert prompt is not None
    router.index.remove("d0")
    router.index.apply("d2", [_stored(tokens[: 2 * B])])  # takes d0's id
    d0, d1, d2 = _engine("d0"), _engine("d1"), _engine("d2")
    assert router.order([d2, d1, d0], prompt) == [d0, d1, d2]  # 64, 16 and 0 cached tokens
    assert prompt.cache.device_blocks == {"d0": 4, "d1": 1}
    assert router.policy.saved_tokens("d2", prompt.cache) == 0


def test_tokenizer_gives_the_engines_token_ids() -> None:
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models")
    tokenize = PromptTokenizer(str(model))
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(model)
    text = "def main():\n    return 42\n"
    assert tokenize({"prompt": text}) == reference.encode(text)
    for other in ("", " ", "Introduce Beijing Forbidden City", "naïve café — 北京 故宫 🙂", "x" * 3000):
        assert tokenize({"prompt": other}) == reference.encode(other)
    assert tokenize({"prompt": [text]}) == reference.encode(text)
    assert tokenize({"prompt": [5, 6, 7]}) == [5, 6, 7]
    messages = [{"role": "user", "content": "hello"}]
    chat = tokenize({"messages": messages})
    assert chat == list(reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def test_following_engines_drops_restarted_and_gone_ones() -> None:
    async def scenario() -> None:
        index = KVIndex(B)
        router = KVRouter(index, tokenize=lambda body: None, subscriber=KVEventSubscriber(index))
        await router.start()
        try:
            port = free_port()
            router.follow([_engine("d0", events_port=port), _engine("p0", role="prefill")])  # p0 publishes nothing
            assert router._watched == {"d0": ("127.0.0.1", port, 0)}
            index.apply("d0", [_stored(list(range(2 * B)))])
            router.follow([_engine("d0", events_port=port)])
            assert index.entries("d0") == 2  # unchanged: kept
            router.follow([_engine("d0", events_port=port, restarts=1)])
            assert index.entries("d0") == 0 and router._watched == {"d0": ("127.0.0.1", port, 1)}
            index.apply("d0", [_stored(list(range(B)))])
            router.follow([])
            assert index.entries("d0") == 0 and router._watched == {}
        finally:
            await router.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("salt", ["tenant-a", "tenant-b"])
def test_cache_salt_separates_prompts(salt: str) -> None:
    router = _router()
    tokens = list(range(2 * B + 1))
    router.index.apply("d0", [_stored(tokens[: 2 * B])])
    plain = router.prompt({"prompt": tokens})
    salted = router.prompt({"prompt": tokens, "cache_salt": salt})
    assert plain is not None and salted is not None
    assert plain.cache.device_blocks == {"d0": 2}
    assert salted.cache.device_blocks == {}


def test_with_prefix_reuse_an_idle_engine_loading_from_the_store_beats_a_busy_holder() -> None:
    tokens = list(range(24 * B + 1))
    for track_store, expected in ((True, ["idle", "busy"]), (False, ["busy", "idle"])):
        router = KVRouter(KVIndex(B, track_store=track_store), tokenize=lambda body: body.get("prompt"),
                          policy=KVAware(store_reuse=track_store))  # fmt: skip
        router.index.apply("busy", [_stored(tokens[: 24 * B])])
        prompt = router.prompt({"prompt": tokens})
        assert prompt is not None and prompt.cache.store_blocks == (24 if track_store else 0)
        # busy: 384 cached tokens less 256 for its request in flight; idle: the same 384
        # loaded from the store at 5% of their compute (without the store: nothing)
        order = router.order([_engine("busy", outstanding=1), _engine("idle")], prompt)
        assert [engine.name for engine in order] == expected


def _predicted_tokens(metrics: DoorMetrics, engine: str) -> float:
    return metrics.registry.get_sample_value("frontdoor_kv_predicted_cached_tokens_total", {"engine": engine}) or 0.0


def test_a_routed_prompt_draws_the_same_prompt_to_its_engine_before_its_events_come() -> None:
    clock, metrics = _Clock(), DoorMetrics()
    router = _router(selective_pd_tokens=40, clock=clock, metrics=metrics)
    tokens = list(range(100, 100 + 6 * B + 10))  # 6 full blocks + 10 tokens
    d0, d1, d2 = _engine("d0"), _engine("d1", outstanding=1), _engine("d2")
    first = router.prompt({"prompt": tokens})
    assert first is not None and len(first.hashes) == 6
    chosen, other, busy = router.order([d0, d1, d2], first)  # nothing cached: by load, ties rotated from the key
    assert {chosen.name, other.name} == {"d0", "d2"} and busy is d1
    router.predicted(chosen, first)
    router.routed(chosen, first)  # the door sends it there
    assert first.cache.device_blocks == {}  # the first prompt keeps what the index said when it came
    second = router.prompt({"prompt": tokens})
    assert second is not None and second.cache.device_blocks == {chosen.name: 6}
    assert router.order([d0, d1, d2], second) == router.order([d2, d1, d0], second) == [chosen, other, d1]
    assert router.policy.saved_tokens(chosen.name, second.cache) == 96  # 6 blocks; the last token is computed
    assert router.skip_prefill(chosen, second) and not router.skip_prefill(other, second)
    router.predicted(chosen, second)
    assert _predicted_tokens(metrics, chosen.name) == 96
    assert router.index.stats().provisional_entries == 6
    # its events never come (the request failed): the holding ends after the TTL
    clock.now = 10.0
    third = router.prompt({"prompt": tokens})
    assert third is not None and third.cache.device_blocks == {}
    assert router.policy.saved_tokens(chosen.name, third.cache) == 0 and not router.skip_prefill(chosen, third)
    assert router.index.stats().expired_provisional == 6


def test_the_engines_events_confirm_a_routed_prompt() -> None:
    clock = _Clock()
    router = _router(clock=clock)
    tokens = list(range(4 * B + 1))
    prompt = router.prompt({"prompt": tokens})
    assert prompt is not None
    router.routed(_engine("p0", role="prefill"), prompt)
    router.index.apply("p0", [_stored(tokens[: 4 * B])])
    clock.now = 60.0
    router.publish()
    again = router.prompt({"prompt": tokens})
    assert again is not None and again.cache.device_blocks == {"p0": 4}
    stats = router.index.stats()
    assert (stats.confirmed_provisional, stats.expired_provisional, stats.entries) == (4, 0, 4)


def test_publish_ends_expired_holdings_and_follow_forgets_engines_that_left() -> None:
    clock = _Clock()
    router = _router(clock=clock)
    short, long = router.prompt({"prompt": list(range(B))}), router.prompt({"prompt": list(range(3 * B))})
    assert short is not None and long is not None
    router.routed(_engine("d0"), long)
    clock.now = 5.0
    router.routed(_engine("d1"), short)
    clock.now = 10.0
    router.publish()
    assert (router.index.provisional("d0"), router.index.provisional("d1")) == (0, 1)
    router.follow([_engine("d0")])  # d1 left the table: it publishes no events, but the index knew it
    assert router.index.engines() == ["d0"] and router.index.provisional() == 0


def test_prompts_shorter_than_a_block_spread_over_equal_engines() -> None:
    """Nothing to match in a prompt under one block: equal engines are taken in a
    rotation that starts from the prompt's own tokens, not always from the first."""
    router = _router()
    engines = [_engine("d0"), _engine("d1"), _engine("d2")]
    firsts = []
    for length in (3, 4, 5, 6, 7, 8):
        tokens = list(range(length))
        prompt = router.prompt({"prompt": tokens})
        assert prompt is not None and prompt.hashes == []
        start = (hash(tuple(tokens)) & 0x7FFFFFFFFFFFFFFF) % 3
        order = router.order(engines, prompt)
        assert order == engines[start:] + engines[:start]
        firsts.append(order[0].name)
    assert len(set(firsts)) > 1
