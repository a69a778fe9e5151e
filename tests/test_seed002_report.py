"""Seed 002's benchmark parts (no deployment): the random-prompt generator in the served
model's tokenizer, the % difference row, the table and plot writers, the arms' settings.
How the vllm-router arm finds the engines in state.json: tests/test_router_arm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.datasets import random_prompts, token_count
from benchmarks.report import Spread
from benchmarks.seed002 import (
    ARMS,
    REPORTED,
    TABLE_COLUMNS,
    difference_row,
    parse_args,
    percent_difference,
    report_table,
    write_report,
)
from deploy.config import build_config
from deploy.embedded_model import ensure_embedded_model
from testkit.helpers import PROJECT_ROOT

# Seed 002's table (DeepSeek-R1-Distill-Qwen-32B on 8 NPUs), in TABLE_COLUMNS' order (it has no goodput).
SEED_PD = (101.51, 293.34, 294.72, 454.66, 137.62, 131.97, 258.57, 115.40, 99.60, 331.31, 1.97, 421.38, 847.74)
SEED_TP8 = (123.21, 292.91, 288.79, 446.85, 203.34, 189.29, 326.60, 162.39, 134.57, 644.48, 1.62, 348.55, 699.81)
HEADER = (
    "| arm | duration s | mean TTFT ms | median TTFT ms | P99 TTFT ms | mean TPOT ms | median TPOT ms | P99 TPOT ms "
    "| mean ITL ms | median ITL ms | P99 ITL ms | req/s | output tok/s | total tok/s | goodput req/s |"
)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(ensure_embedded_model(PROJECT_ROOT / ".cache" / "models"))


def _run(**figures: float) -> dict[str, float]:
    return {**{key: 0.0 for key in REPORTED}, **figures}


def _spreads(values: tuple[float, ...]) -> dict[str, Spread]:
    return {key: Spread.of([value]) for key, value in zip(REPORTED[: len(values)], values, strict=True)}


def test_random_prompts_have_exactly_the_asked_token_count(tokenizer: object) -> None:
    prompts = random_prompts(tokenizer, count=5, tokens=216, seed=3)  # type: ignore[arg-type]
    assert len(prompts) == 5
    assert [token_count(tokenizer, prompt) for prompt in prompts] == [216] * 5  # type: ignore[arg-type]
    assert len(set(prompts)) == 5  # independent prompts, not one repeated


def test_random_prompts_are_fixed_by_their_seed(tokenizer: object) -> None:
    first = random_prompts(tokenizer, count=3, tokens=40, seed=1)  # type: ignore[arg-type]
    assert random_prompts(tokenizer, count=3, tokens=40, seed=1) == first  # type: ignore[arg-type]
    other = random_prompts(tokenizer, count=3, tokens=40, seed=2)  # type: ignore[arg-type]
    assert not set(other) & set(first)


def test_random_prompts_refuse_an_empty_workload(tokenizer: object) -> None:
    with pytest.raises(ValueError, match="tokens must be at least 1, got 0"):
        random_prompts(tokenizer, count=3, tokens=0, seed=1)  # type: ignore[arg-type]


def test_percent_difference_is_signed_and_relative_to_the_baseline() -> None:
    assert percent_difference(75.0, 100.0) == -25.0
    assert percent_difference(3.0, 2.0) == 50.0
    assert percent_difference(1.0, 0.0) is None


def test_the_difference_row_reproduces_seed_002s_own_row() -> None:
    spreads = {"PD": _spreads(SEED_PD), "TP=8": _spreads(SEED_TP8)}
    assert difference_row(spreads, against="PD", baseline="TP=8") == [
        "% difference (PD vs TP=8)",
        "-17.61%", "+0.15%", "+2.05%", "+1.75%", "-32.32%", "-30.28%", "-20.83%", "-28.94%", "-25.99%", "-48.59%",
        "+21.60%",
        "+20.90%",  # the seed prints +20.89%, from unrounded figures; 421.38 / 348.55 is +20.895%
        "+21.14%",
        "-",  # goodput: not in the seed's table
    ]  # fmt: skip


def test_a_zero_baseline_gives_no_percentage() -> None:
    spreads = {"a": _spreads((1.0,) * 13), "b": _spreads((0.0,) + (1.0,) * 12)}
    assert difference_row(spreads, against="a", baseline="b")[1:3] == ["-", "+0.00%"]


def test_the_table_has_seed_002s_columns_a_row_per_measured_arm_and_the_difference_row() -> None:
    arms = {
        "1p1d": {"runs": [_run(duration_s=10.0, request_throughput=3.0, mean_ttft_ms=200.0),
                          _run(duration_s=12.0, request_throughput=2.5, mean_ttft_ms=240.0),
                          _run(duration_s=11.0, request_throughput=2.0, mean_ttft_ms=220.0)]},
        "1p1d-vllm-router": {"skipped": "installing vllm-router==0.1.17 failed"},
        "colocated-1x2": {"runs": [_run(duration_s=8.0, request_throughput=4.0, mean_ttft_ms=100.0)]},
    }  # fmt: skip
    lines = report_table(arms, against="1p1d", baseline="colocated-1x2").splitlines()
    assert lines[0] == HEADER
    assert lines[1] == "|" + "---|" * (len(TABLE_COLUMNS) + 1)
    assert lines[2] == (
        "| 1p1d | 11.00 (10.00-12.00) | 220.00 (200.00-240.00) | " + "0.00 | " * 8 + "2.50 (2.00-3.00) | 0.00 | 0.00 | 0.00 |"
    )
    assert lines[3].startswith("| colocated-1x2 | 8.00 | 100.00 | 0.00 |")
    assert lines[4].startswith("| % difference (1p1d vs colocated-1x2) | +37.50% | +120.00% | - |")
    assert lines[4].endswith("| -37.50% | - | - | - |")
    assert len(lines) == 5  # the skipped arm has no row


def test_no_difference_row_without_both_compared_arms() -> None:
    arms = {"1p1d": {"runs": [_run(duration_s=10.0)]}, "colocated-1x2": {"skipped": "not run"}}
    lines = report_table(arms, against="1p1d", baseline="colocated-1x2").splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 1p1d | 10.00 |")


def test_report_writes_the_table_with_notes_and_two_plots(tmp_path: Path) -> None:
    arms = {
        "1p1d": {"runs": [_run(request_throughput=2.0, mean_ttft_ms=300.0, mean_tpot_ms=40.0)], "failed_requests": 2},
        "1p1d-vllm-router": {"skipped": "no network"},
        "colocated-1x2": {"runs": [_run(request_throughput=3.0, mean_ttft_ms=200.0, mean_tpot_ms=50.0)],
                          "failed_requests": 0},
        "colocated-2x1": {"error": "vllm bench serve failed (rc 1)"},
    }  # fmt: skip
    written = write_report(arms, tmp_path / "seed002", against="1p1d", baseline="colocated-1x2")
    assert [path.name for path in written] == ["seed002.md", "seed002_req_s.png", "seed002_latency.png"]
    text = (tmp_path / "seed002.md").read_text()
    assert text.startswith(HEADER + "\n")
    assert text.endswith("| -33.33% | - | - | - |\n\n- 1p1d-vllm-router: skipped: no network\n"
                         "- colocated-2x1: error: vllm bench serve failed (rc 1)\n- 1p1d: 2 failed request(s)\n")
    for plot in written[1:]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_every_arm_is_a_valid_deployment_on_the_same_two_cores(tmp_path: Path) -> None:
    needed = {}
    for name, arm in ARMS.items():
        env = {"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "YR_SESSIONS_DIR": str(tmp_path), **arm.settings}
        config = build_config(env, master_answers=lambda host, port: False)
        needed[name] = (config.devices_needed, config.disaggregated)
    assert needed == {
        "1p1d": (2, True), "1p1d-vllm-router": (2, True), "colocated-1x2": (2, False), "colocated-2x1": (2, False),
    }  # fmt: skip
    assert ARMS["1p1d-vllm-router"].settings == ARMS["1p1d"].settings
    assert [name for name, arm in ARMS.items() if arm.through_router] == ["1p1d-vllm-router"]


def test_options_name_known_arms(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args([])
    assert (args.arms, args.baseline, args.against) == (list(ARMS), "colocated-1x2", "1p1d")
    assert (args.prompts, args.input, args.output, args.concurrency, args.repeats) == (32, 256, 128, 8, 3)
    with pytest.raises(SystemExit):
        parse_args(["--baseline", "tp8"])
    assert "unknown arm(s) tp8" in capsys.readouterr().err
