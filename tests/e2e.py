"""Helpers for the end-to-end tests: a deployment started and cleaned by the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.state import DeploymentState
from tests.helpers import isolated_env, run_cli

BLOCK_SIZE = 128  # vLLM's CPU block size
PROMPT_LENGTHS = (BLOCK_SIZE // 2, BLOCK_SIZE, 3 * BLOCK_SIZE + 17)  # shorter than, equal to, longer than a block


@dataclass
class Deployment:
    env: dict[str, str]
    url: str
    state: DeploymentState

    def engine_url(self, role: str) -> str:
        engine = next(e for e in self.state.engines if e["role"] == role)
        return f"http://{engine['host']}:{engine['port']}"


@contextmanager
def deployed(tmp: Path, **settings: str) -> Iterator[Deployment]:
    """Deploy with ``bash run_vllm_on_yr.sh deploy``; always ``clean`` afterwards."""
    env = isolated_env(tmp, PREFILL_STARTUP_PARAMS="--enforce-eager", DECODE_STARTUP_PARAMS="--enforce-eager", **settings)
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
