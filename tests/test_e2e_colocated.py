"""End to end, PD-colocated (DECODE_INS_NUM=0): one kv_both instance serves requests
itself. Its greedy outputs are recorded for test_e2e_pd to compare PD against."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e import PROMPT_LENGTHS, Deployment, complete, deployed, token_prompt
from tests.helpers import run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def colocated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("colocated"), DECODE_INS_NUM="0", PREFILL_INS_NUM="1") as running:
        yield running


def test_one_colocated_instance_serves(colocated: Deployment, colocated_outputs: dict[int, dict[str, object]]) -> None:
    status = run_cli("status", colocated.env, timeout=120)
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("colocated-")]
    assert [(row[0], row[1], row[5]) for row in rows] == [("colocated-0", "colocated", "healthy")]
    for length in PROMPT_LENGTHS:
        body = {"prompt": token_prompt(length), "max_tokens": 12, "temperature": 0}
        choice = complete(colocated.url, body)["choices"][0]  # type: ignore[index]
        assert choice["finish_reason"] == "length"
        colocated_outputs[length] = choice
