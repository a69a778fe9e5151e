"""A battery of malformed requests for the front door: bad JSON, wrong types, bad
sampling values, prompts too long or out of the vocabulary, unknown models, huge bodies.
A healthy service answers each with a 4xx in OpenAI's error form (a few odd but valid
ones with 200), never a 5xx, and serves normal requests afterwards.

    .venv/bin/python -m tests.malformed --url http://127.0.0.1:8000 --count 1000 [--seed 0]

(against a running deployment; the suite runs a short battery in tests/test_e2e_pd.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
from dataclasses import dataclass, field

import httpx

_COMPLETIONS, _CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass(frozen=True)
class Case:
    kind: str
    path: str
    content: bytes


def _json(kind: str, path: str, body: object) -> Case:
    return Case(kind, path, json.dumps(body).encode())


def _cases(model: str, vocab_size: int, max_model_len: int, rng: random.Random) -> list[Case]:
    """One of each kind, with random values where the kind allows."""
    text = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 40)))
    huge_int = rng.choice([10**12, 2**63, -(2**63), 10**30])
    return [
        Case("truncated json", _COMPLETIONS, b'{"prompt": "' + text.encode()),
        Case("random bytes", _COMPLETIONS, rng.randbytes(rng.randint(1, 64))),
        Case("invalid utf-8", _CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        Case("empty body", _COMPLETIONS, b""),
        _json("not an object", rng.choice([_COMPLETIONS, _CHAT]), rng.choice([[1, 2], "prompt", 3, None, True])),
        _json("missing prompt", _COMPLETIONS, {"model": model, "max_tokens": 3}),
        _json("missing messages", _CHAT, {"model": model, "prompt": text}),
        _json("prompt of a wrong type", _COMPLETIONS, {"prompt": rng.choice([123, {"a": 1}, [None], [[1.5]], True, [{}]])}),
        _json("messages of a wrong type", _CHAT, {"messages": rng.choice(["hi", [1], [{"role": 5}], [{"content": None}], {}])}),
        _json("bad max_tokens", _COMPLETIONS, {"prompt": text, "max_tokens": rng.choice([-1, 0, huge_int, "ten", 1.5, [3]])}),
        _json("bad temperature", _COMPLETIONS, {"prompt": text, "max_tokens": 2, "temperature": rng.choice([-1, "hot", 1e300, [0]])}),
        Case("infinite temperature", _COMPLETIONS, f'{{"prompt": "{text}", "max_tokens": 2, "temperature": 1e999}}'.encode()),
        _json("bad top_p", _CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 2, "top_p": rng.choice([0, -0.5, 2, "x"])}),
        _json("bad n", _COMPLETIONS, {"prompt": text, "max_tokens": 2, "n": rng.choice([0, -3, "two", 10**6])}),
        _json("bad logprobs", _COMPLETIONS, {"prompt": text, "max_tokens": 2, "logprobs": rng.choice([-1, 10**6, "all"])}),
        _json("bad stop", _COMPLETIONS, {"prompt": text, "max_tokens": 2, "stop": rng.choice([5, [1, 2], {"a": "b"}])}),
        _json("bad stream", _COMPLETIONS, {"prompt": text, "max_tokens": 2, "stream": rng.choice(["yes", 2, [True]])}),
        _json("unknown model", rng.choice([_COMPLETIONS, _CHAT]), {"model": f"not-{model}", "prompt": text, "messages": []}),
        _json("model of a wrong type", _COMPLETIONS, {"model": rng.choice([5, ["m"], {"m": 1}]), "prompt": text}),
        _json("token ids out of the vocabulary", _COMPLETIONS,
              {"prompt": [rng.choice([vocab_size, vocab_size + 7, 2**31 - 1, -1]) for _ in range(rng.randint(1, 8))], "max_tokens": 2}),
        _json("prompt longer than the model allows", _COMPLETIONS,
              {"prompt": [rng.randrange(10, vocab_size) for _ in range(max_model_len + rng.randint(1, 64))], "max_tokens": 2}),
        _json("max_tokens beyond the context", _COMPLETIONS, {"prompt": text, "max_tokens": max_model_len * 4}),
        _json("huge body", _COMPLETIONS, {"prompt": "word " * rng.randint(200_000, 400_000), "max_tokens": 2}),
        _json("unknown fields", _COMPLETIONS, {"prompt": text, "max_tokens": 2, rng.choice(["foo", "bar"]): {"nested": [1]}}),
        _json("empty messages", _CHAT, {"messages": [], "max_tokens": 2}),
    ]  # fmt: skip


def malformed_requests(count: int, seed: int, model: str, vocab_size: int, max_model_len: int) -> list[Case]:
    """``count`` cases, every kind in turn, values drawn from ``seed``."""
    rng = random.Random(seed)
    cases: list[Case] = []
    while len(cases) < count:
        cases.extend(_cases(model, vocab_size, max_model_len, rng))
    return cases[:count]


@dataclass
class BatteryReport:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: list[tuple[str, int, str]] = field(default_factory=list)  # (kind, status, body head)
    not_openai_form: list[tuple[str, int, str]] = field(default_factory=list)
    transport_errors: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"statuses {dict(sorted(self.statuses.items()))}; {len(self.server_errors)} 5xx, "
                f"{len(self.not_openai_form)} errors not in OpenAI form, {len(self.transport_errors)} transport errors")  # fmt: skip


def _openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


async def run_battery(url: str, cases: list[Case], concurrency: int = 8, timeout_s: float = 120) -> BatteryReport:
    report = BatteryReport()
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout_s) as client:

        async def send(case: Case) -> None:
            async with limit:
                try:
                    response = await client.post(f"{url}{case.path}", content=case.content,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                except httpx.HTTPError as exc:
                    report.transport_errors.append((case.kind, repr(exc)[:200]))
                    return
            report.statuses[response.status_code] += 1
            head = response.content[:200].decode(errors="replace")
            if response.status_code >= 500:
                report.server_errors.append((case.kind, response.status_code, head))
            elif response.status_code >= 400 and not _openai_error(response.content):
                report.not_openai_form.append((case.kind, response.status_code, head))

        await asyncio.gather(*(send(case) for case in cases))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the front door, e.g. http://127.0.0.1:8000")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096, help="the served model's vocabulary (embedded model: 4096)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    model = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    cases = malformed_requests(args.count, args.seed, model, args.vocab_size, args.max_model_len)
    report = asyncio.run(run_battery(args.url, cases))
    print(report.summary())
    for kind, status, head in report.server_errors[:20] + report.not_openai_form[:20]:
        print(f"  {kind}: HTTP {status}: {head}")
    healthy = httpx.get(f"{args.url}/health", timeout=10).status_code == 200
    print(f"service healthy afterwards: {healthy}")
    raise SystemExit(0 if healthy and not report.server_errors and not report.transport_errors else 1)


if __name__ == "__main__":
    main()
