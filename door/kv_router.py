"""KV-aware routing in the door: which engine already holds a prompt's KV, and whether a
PD request may skip its prefill leg.

Pieces (each in its own module): the engines' KV events keep a ``KVIndex`` current
(``KVEventSubscriber``); the prompt's token ids come from the request (token-id prompts)
or from the served model's tokenizer (``PromptTokenizer``); ``KVAware`` orders the
candidates by the prompt tokens they would not compute, less their load.

Selective disaggregation (``skip_prefill``): a PD request goes straight to a decode
engine, without the prefill leg, when the part of its prompt that the chosen decode
engine does not hold in its device cache is at most ``selective_pd_tokens`` tokens
(short prompts, repeated prompts, later turns of a conversation that decode served).
The decode engine then computes that part itself; the prefill leg's round trip, its
save and the decode's load are saved. In an adaptive pool (ROLES=adaptive) the planner
split the engines to keep prompts from stalling the decodes, so there a request skips
its prefill leg only to a decode engine with nothing in flight.

The data system tier: with prefix reuse on, the index estimates what the store holds
from the same events (``KVIndex.store_match``: every block an engine announced was
saved by our connector), so an engine that would load the prompt's head from the store
is credited with it (at ``KVAware.store_load_cost``); without prefix reuse it is scored 0.
What the door does not know: the store's evictions (TTL, a full store: such blocks are
computed after all), and prompts with images (their blocks carry multimodal hashes the
door cannot compute: such prompts match only up to their first image).

Provisional holdings (``routed``): the door tells the router which engine will compute
a prompt (the colocated engine, the prefill engine, or the decode engine when the
prefill leg is skipped), and the index counts that engine as holding the prompt's full
blocks at once (``KVIndex.hold``), before the engine's events say so, so that
concurrent requests sharing the prompt's head go where it is being computed. The
engine's events confirm the blocks, or the index's ``provisional_ttl_s`` ends them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from door.door_metrics import DoorMetrics
from door.kv_events import KVEventSubscriber
from door.kv_index import KVIndex
from door.kv_policy import KVAware, PromptCache
from door.policies import EngineLoad
from workers.kv_events_config import event_endpoints

logger = logging.getLogger(__name__)

Tokenize = Callable[[dict[str, Any]], "list[int] | None"]


@dataclass(frozen=True)
class RoutedPrompt:
    """One request's prompt as the router sees it."""

    tokens: int
    cache: PromptCache
    hashes: list[int]  # the chained hashes of its full blocks (``KVIndex.hashes``)


class PromptTokenizer:
    """The prompt's token ids as the engine will see them: token-id prompts as given,
    text through the served model's tokenizer, chat through its chat template."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer  # the door imports it only for KV-aware routing

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        # A fast tokenizer's own Rust encoder gives the same ids (special tokens added as
        # the engine adds them) at half the cost per call: 8 against 16 us for a short prompt.
        backend = getattr(self._tokenizer, "_tokenizer", None) if self._tokenizer.is_fast else None
        self._encode: Callable[[str], list[int]] = (
            (lambda text: backend.encode(text, add_special_tokens=True).ids) if backend is not None
            else (lambda text: list(self._tokenizer.encode(text)))
        )  # fmt: skip

    def __call__(self, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt):
            return prompt
        try:
            if isinstance(prompt, str):
                return self._encode(prompt)
            messages = body.get("messages")
            if isinstance(messages, list):
                ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        except Exception as exc:  # a body the template rejects: the engine will say why; route without KV
            logger.debug("could not tokenize a request for KV routing: %s", exc)
        return None


class KVRouter:
    def __init__(
        self,
        index: KVIndex,
        tokenize: Tokenize,
        policy: KVAware | None = None,
        selective_pd_tokens: int = 0,
        subscriber: KVEventSubscriber | None = None,
        metrics: DoorMetrics | None = None,
    ) -> None:
        self.index = index
        self.policy = policy or KVAware()
        self.selective_pd_tokens = selective_pd_tokens
        self._tokenize = tokenize
        self._subscriber = subscriber
        self._metrics = metrics
        self._watched: dict[str, tuple[str, int, int]] = {}  # engine -> (host, events port, restarts)

    async def start(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.start()

    async def close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()

    def follow(self, engines: Sequence[EngineLoad]) -> None:
        """Watch the engines of the routing table: a new one is subscribed to (its
        history replayed), a restarted or moved one starts from scratch, a gone one is
        dropped from the index (also one that publishes no events, known to the index
        by its provisional holdings)."""
        listed = {engine.name for engine in engines}
        for name in [name for name in self.index.engines() if name not in listed]:
            self.index.remove(name)
        if self._subscriber is None:
            return
        current = {engine.name: (engine.host, engine.events_port, engine.restarts) for engine in engines if engine.events_port}
        for name in [name for name in self._watched if current.get(name) != self._watched[name]]:
            self._subscriber.unwatch(name)
            self.index.remove(name)
            del self._watched[name]
        for name, where in current.items():
            if name not in self._watched:
                host, port, _ = where
                self._subscriber.watch(name, *event_endpoints(host, port))
                self._watched[name] = where
                logger.info("[engine=%s] following its KV events at %s:%d", name, host, port)

    def publish(self) -> None:
        """Each engine's indexed blocks into the door's metrics; provisional holdings past
        their time-to-live end (the door calls this once a second)."""
        expired = self.index.expire()
        if expired:
            logger.debug("KV index: %d provisional blocks expired unconfirmed", expired)
        if self._metrics is not None:
            for name in self._watched:
                self._metrics.kv_indexed_blocks.labels(name).set(self.index.entries(name))

    def prompt(self, body: dict[str, Any]) -> RoutedPrompt | None:
        """What the index knows of this request's prompt; None without token ids. The
        index lookups of a decision: ``match`` (device caches), and ``store_match`` (the
        data system, a dict lookup per leading block) when the index tracks the store."""
        tokens = self._tokenize(body)
        if not tokens:
            return None
        salt = body.get("cache_salt")
        hashes = self.index.hashes(tokens, cache_salt=salt if isinstance(salt, str) else None)
        # Where equal candidates start (the policy rotates them by it): the first block's
        # hash, or for a prompt shorter than a block its tokens', so short prompts spread.
        key = hashes[0] if hashes else hash(tuple(tokens)) & 0x7FFFFFFFFFFFFFFF
        cache = PromptCache(len(tokens), self.index.block_size, self.index.match(hashes),
                            store_blocks=self.index.store_match(hashes), key=key)  # fmt: skip
        return RoutedPrompt(len(tokens), cache, hashes)

    def order(self, candidates: Sequence[EngineLoad], prompt: RoutedPrompt) -> list[EngineLoad]:
        return self.policy.order_cached(candidates, prompt.cache)

    def skip_prefill(self, decode: EngineLoad, prompt: RoutedPrompt, only_idle: bool = False) -> bool:
        """Whether ``decode`` computes the rest of this prompt itself (module docstring).
        ``only_idle`` (an adaptive pool, split to keep prompts off the decode engines):
        only when ``decode`` has nothing in flight, no stream for the prompt to stall."""
        if self.selective_pd_tokens <= 0 or (only_idle and decode.outstanding > 0):
            return False
        uncached = prompt.tokens - self.policy.saved_tokens(decode.name, prompt.cache)
        return uncached <= self.selective_pd_tokens

    def routed(self, engine: EngineLoad, prompt: RoutedPrompt) -> None:
        """The door sends ``prompt`` to ``engine``, which will compute it: the index counts
        ``engine`` as holding its full blocks until its events confirm them or the index's
        time-to-live ends them (``KVIndex.hold``). The ``prompt`` itself keeps what the
        index said when it came."""
        self.index.hold(engine.name, prompt.hashes)

    def predicted(self, engine: EngineLoad, prompt: RoutedPrompt) -> None:
        """Count the prompt tokens ``engine`` is expected to find in its device cache."""
        if self._metrics is not None:
            self._metrics.kv_predicted_tokens.labels(engine.name).inc(self.policy.saved_tokens(engine.name, prompt.cache))
