"""Warm the KV path before engines serve: one synthetic request through each new engine,
a prefill -> decode handoff through the data system for PD engines.

An engine's first requests pay for what nothing did before them: the connector's first
save and load (the data system client's connection, shared memory mapped and touched,
staging buffers), the first forward pass of a long prompt, the HTTP connections. The
Controller runs this on engines that just became healthy (at deploy and at scale-out)
before they join its engine list, so that the door routes nothing to them before it has
run: every new prefill engine is paired with a decode engine and every new decode engine
with a prefill engine (new ones first, then running ones), and each pair computes one
prompt of ``tokens`` token ids (a partial last block included) as a prefill leg, then
loads it as a decode leg. Colocated engines compute one prompt each. The prompts carry
a ``cache_salt`` of their own, so no client request ever hits their blocks; a prompt is
no longer than the engines' ``max_model_len`` allows.

A warm-up that fails is logged and does not stop the deployment: the engine is healthy,
only slower on its first request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 300.0  # per engine call
_VOCAB_SPAN = 1000  # token ids from 10 on: inside any model's vocabulary


@dataclass(frozen=True)
class WarmUpResult:
    engines: tuple[str, ...]  # the engines whose requests succeeded
    failed: tuple[str, ...]  # "engine: why", one per failed request
    seconds: float


def warm_up_pairs(new: Sequence[Mapping[str, object]], running: Sequence[Mapping[str, object]]) -> list[tuple[Mapping[str, object], ...]]:
    """The requests that warm ``new`` engines: (prefill, decode) pairs so that each new PD
    engine is in one (a partner among the new ones of the other role first, round robin,
    else a running one), and (colocated,) for each new colocated engine. Headless engines
    (a DP group's ranks behind its head) serve nothing themselves and are skipped."""
    served = [engine for engine in new if not engine.get("headless")]
    partners = {role: [e for e in served if e["role"] == role] or [e for e in running if e["role"] == role and not e.get("headless")]
                for role in ("prefill", "decode")}  # fmt: skip
    pairs: list[tuple[Mapping[str, object], ...]] = [(engine,) for engine in served if engine["role"] in ("colocated", "adaptive")]
    new_prefills = [e for e in served if e["role"] == "prefill"]
    new_decodes = [e for e in served if e["role"] == "decode"]
    for index in range(max(len(new_prefills), len(new_decodes))):
        prefill = new_prefills[index] if index < len(new_prefills) else _nth(partners["prefill"], index)
        decode = new_decodes[index] if index < len(new_decodes) else _nth(partners["decode"], index)
        if prefill is not None and decode is not None:
            pairs.append((prefill, decode))
    return pairs


def _nth(engines: Sequence[Mapping[str, object]], index: int) -> Mapping[str, object] | None:
    return engines[index % len(engines)] if engines else None


def warm_up(new: Sequence[Mapping[str, object]], running: Sequence[Mapping[str, object]], served_model_name: str,
            tokens: int, api_key: str | None = None) -> WarmUpResult:  # fmt: skip
    """Run the warm-up requests of ``new`` engines (``warm_up_pairs``), the pairs at once."""
    started = time.monotonic()
    pairs = warm_up_pairs(new, running)
    if tokens <= 0 or not pairs:
        return WarmUpResult((), (), 0.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=WARM_UP_TIMEOUT_S, headers=headers, trust_env=False) as client:
        with ThreadPoolExecutor(len(pairs), thread_name_prefix="warm-up") as pool:
            outcomes = list(pool.map(lambda pair: _warm(client, pair, served_model_name, tokens), pairs))
    warmed = tuple(dict.fromkeys(name for names, _ in outcomes for name in names))
    failed = tuple(failure for _, failures in outcomes for failure in failures)
    return WarmUpResult(warmed, failed, round(time.monotonic() - started, 3))


def _warm(client: httpx.Client, pair: tuple[Mapping[str, object], ...], model: str, tokens: int) -> tuple[list[str], list[str]]:
    tokens = min(tokens, *(_max_prompt(client, engine) for engine in pair))
    salt = f"warm-up-{uuid.uuid4().hex}"
    offset = uuid.uuid4().int % _VOCAB_SPAN
    body: dict[str, object] = {"model": model, "prompt": [10 + (offset + 7 * i) % _VOCAB_SPAN for i in range(tokens)],
                               "max_tokens": 2, "temperature": 0, "ignore_eos": True, "cache_salt": salt}  # fmt: skip
    first = pair[0]
    try:
        if len(pair) == 1:
            _post(client, first, body)
            return [str(first["name"])], []
        prefill_leg = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        params = _post(client, first, prefill_leg).get("kv_transfer_params")
        if not isinstance(params, dict):
            return [str(first["name"])], [f"{pair[1]['name']}: {first['name']} handed over no kv_transfer_params"]
        _post(client, pair[1], {**body, "kv_transfer_params": params})
        return [str(first["name"]), str(pair[1]["name"])], []
    except (httpx.HTTPError, ValueError) as exc:
        return [], [f"{' -> '.join(str(engine['name']) for engine in pair)}: {exc}"]


def _max_prompt(client: httpx.Client, engine: Mapping[str, object]) -> int:
    """The longest prompt ``engine`` takes with 2 tokens to generate (its ``max_model_len``
    from ``/v1/models``, as vLLM lists it); unbounded if it does not say."""
    try:
        models = client.get(f"http://{engine['host']}:{engine['port']}/v1/models").json()
        return max(1, int(models["data"][0]["max_model_len"]) - 2)
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return 1 << 30


def _post(client: httpx.Client, engine: Mapping[str, object], body: dict[str, object]) -> dict[str, object]:
    response = client.post(f"http://{engine['host']}:{engine['port']}/v1/completions", json=body)
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
    answer = response.json()
    return answer if isinstance(answer, dict) else {}
