"""Routing policies: which engine of a role serves a request (pure, no I/O).

- round_robin: in turn (the baseline).
- least_outstanding: the engine with the fewest requests in flight through this door.
- prefix_affinity: requests whose prompts start alike go to the same engine, so its
  device prefix cache is hit; rendezvous hashing on the prompt's head picks the
  preferred engine, and an engine more than ``slack`` requests busier than the least
  busy one is passed over, so one hot prefix cannot pile up on one engine.

Each ``order`` returns every candidate, best first: the door tries them in that order
when an engine fails before answering.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.engine_state import EngineState

PREFIX_CHARS = 256  # head of a text prompt that decides affinity
PREFIX_TOKENS = 64  # head of a token-id prompt that decides affinity


@dataclass
class EngineLoad:
    """One engine as the door sees it."""

    name: str
    url: str
    role: str
    healthy: bool = True
    outstanding: int = 0
    state: str = EngineState.HEALTHY  # the Controller's word: healthy, unhealthy (alive, missed probes), restarting, ...
    host: str = ""
    port: int = 0
    events_port: int = 0  # where the engine publishes its KV events (0: it does not)
    restarts: int = 0
    acting: str = ""  # the role the door routes it as: its role, or (ROLES=adaptive) the one the planner set


class Policy(Protocol):
    def order(self, candidates: Sequence[EngineLoad], affinity_key: bytes) -> list[EngineLoad]: ...


@dataclass
class RoundRobin:
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def order(self, candidates: Sequence[EngineLoad], affinity_key: bytes) -> list[EngineLoad]:
        if not candidates:
            return []
        start = next(self._counter) % len(candidates)
        return list(candidates[start:]) + list(candidates[:start])


@dataclass
class LeastOutstanding:
    _tiebreak: RoundRobin = field(default_factory=RoundRobin)

    def order(self, candidates: Sequence[EngineLoad], affinity_key: bytes) -> list[EngineLoad]:
        rotated = self._tiebreak.order(candidates, affinity_key)
        return sorted(rotated, key=lambda engine: engine.outstanding)  # stable: ties stay rotated


@dataclass
class PrefixAffinity:
    slack: int = 4  # how many more in-flight requests than the least busy engine are tolerated

    def order(self, candidates: Sequence[EngineLoad], affinity_key: bytes) -> list[EngineLoad]:
        if not candidates:
            return []
        by_score = sorted(candidates, key=lambda engine: _score(affinity_key, engine.name), reverse=True)
        least = min(engine.outstanding for engine in candidates)
        within = [engine for engine in by_score if engine.outstanding <= least + self.slack]
        return within + [engine for engine in by_score if engine not in within]


def _score(key: bytes, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"|" + name.encode(), digest_size=8).digest(), "big")


POLICIES = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "prefix_affinity": PrefixAffinity}


def affinity_key(body: dict[str, Any]) -> bytes:
    """The head of a request's prompt (completions) or conversation (chat)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS].encode()
    if isinstance(prompt, list):
        return json.dumps(prompt[:PREFIX_TOKENS]).encode()
    messages = body.get("messages")
    if isinstance(messages, list):
        return json.dumps(messages, sort_keys=True, default=str)[:PREFIX_CHARS].encode()
    return b""
