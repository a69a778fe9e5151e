"""Helpers for the end-to-end tests: a deployment started and cleaned by the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.state import DeploymentState
from testkit.helpers import isolated_env, run_cli
from testkit.metrics import metric

BLOCK_SIZE = 128  # vLLM's CPU block size
# one token, shorter than, exactly, and longer than a block
PROMPT_LENGTHS = (1, BLOCK_SIZE // 2, BLOCK_SIZE, 3 * BLOCK_SIZE + 17)
PROMPT_IDS = ["one-token", "short", "one-block", "many-blocks"]
# vLLM arguments of every engine a test judges by greedy equality. In bfloat16, batching
# and a TP=2 engine's reduction order move logits by a few hundredths and flip near ties
# (a fresh clone's CI failed so, on KV that was right); float32 moves them by ~1e-6, far
# below any tie seen, while a wrong block still changes them by whole units.
FLOAT32 = ("--dtype", "float32")
ENGINE_PARAMS = " ".join(("--enforce-eager", *FLOAT32))


@dataclass
class Deployment:
    env: dict[str, str]
    url: str
    state: DeploymentState

    def engine_url(self, role_or_name: str) -> str:
        engine = next(e for e in self.state.engines if role_or_name in (e["role"], e["name"]))
        return f"http://{engine['host']}:{engine['port']}"

    def engine_complete(self, role_or_name: str, body: dict[str, object]) -> dict[str, object]:
        return complete(self.engine_url(role_or_name), {**body, "model": self.state.served_model_name})


@contextmanager
def deployed(tmp: Path, **settings: str) -> Iterator[Deployment]:
    """Deploy with ``bash run_vllm_on_yr.sh deploy``; always ``clean`` afterwards."""
    # Tests that count handed-over tokens exactly allow a slow moment of a shared 2-core
    # machine: a decode waits up to 10 s for a prefill's blocks, a store call up to 5 s.
    # Engines compute in float32 (ENGINE_PARAMS): the tests judge KV by greedy equality.
    settings = {
        "PREFILL_STARTUP_PARAMS": ENGINE_PARAMS,
        "DECODE_STARTUP_PARAMS": ENGINE_PARAMS,
        "KV_HANDOFF_WAIT_MS": "10000",
        "KV_REQUEST_TIMEOUT_MS": "5000",
        **settings,
    }
    env = isolated_env(tmp, **settings)
    try:
        result = run_cli("deploy", env, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ready: http://127.0.0.1:" in result.stdout
        state = DeploymentState.read(Path(env["RUN_DIR"]) / "state.json")
        assert state is not None
        yield Deployment(env, f"http://127.0.0.1:{env['SERVER_PORT']}", state)
    finally:
        run_cli("clean", env, timeout=300)


def token_prompt(length: int) -> list[int]:
    """A prompt of exactly ``length`` token ids (the embedded model's vocabulary is 4096)."""
    return [(7 * i + length) % 4000 + 10 for i in range(length)]


def complete(url: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def external_kv_tokens(engine_url: str) -> float:
    """Prompt tokens whose KV this engine loaded through the connector."""
    return metric(engine_url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


def same_greedy_output(first: dict[str, object], second: dict[str, object]) -> bool:
    a, b = first["choices"][0], second["choices"][0]  # type: ignore[index]
    return bool(a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"])  # type: ignore[index]
