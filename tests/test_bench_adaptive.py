"""The adaptive-roles and adaptive-ramp benchmarks' arithmetic and tables (pure: no engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.adaptive_ramp import Answer, Ramp, buckets, pool_capacity, rate_at
from benchmarks.adaptive_roles import ARMS, COMMON, combined, report_table, store_mb, write_report
from benchmarks.serve_bench import ServeResult
from common.config import Role, SloConfig
from controller.placement import instance_plans
from deploy.config import build_config


def _result(duration_s: float, completed: int, goodput: float) -> ServeResult:
    zeros = {name: 0.0 for name in ServeResult.__dataclass_fields__}
    return ServeResult(**{**zeros, "completed": completed, "failed": 0, "duration_s": duration_s,  # type: ignore[arg-type]
                          "request_throughput": completed / duration_s, "request_goodput": goodput,
                          "mean_ttft_ms": 100.0 * completed, "mean_tpot_ms": 10.0})  # fmt: skip


def test_phases_combine_over_their_summed_time() -> None:
    figures = combined([_result(10.0, 20, 1.0), _result(30.0, 30, 0.5)])  # 10 + 15 good answers in 40 s
    assert figures["duration_s"] == 40.0 and figures["completed"] == 50
    assert figures["request_goodput"] == pytest.approx(25 / 40)
    assert figures["request_throughput"] == pytest.approx(50 / 40)
    assert figures["mean_ttft_ms"] == pytest.approx((2000 * 20 + 3000 * 30) / 50)  # weighted by answers


def _run(goodput: float) -> dict[str, float]:
    return {"request_goodput": goodput, "request_throughput": goodput + 1, "mean_ttft_ms": 500.0, "mean_tpot_ms": 20.0}


def test_the_table_compares_adaptive_with_the_best_and_the_worst_fixed_arm(tmp_path: Path) -> None:
    repeats = [
        {"colocated": {"seed002": _run(2.0)}, "1p1d": {"seed002": _run(1.0)}, "adaptive": {"seed002": _run(2.2)}},
        {"colocated": {"seed002": _run(2.4)}, "1p1d": {"seed002": _run(1.2)}, "adaptive": {"seed002": _run(2.0)}},
        {"colocated": {"seed002": _run(2.2)}, "1p1d": {"seed002": _run(1.1)}, "adaptive": {"seed002": _run(2.4)}},
    ]
    lines = report_table(repeats, ["colocated", "1p1d", "adaptive"], ["seed002"]).splitlines()
    assert lines[0] == "| workload | arm | goodput req/s | req/s | mean TTFT ms | mean TPOT ms | adaptive's goodput vs fixed |"
    assert lines[2] == "| seed002 | colocated | 2.20 (2.00-2.40) | 3.20 (3.00-3.40) | 500 | 20.0 | - |"
    assert lines[4] == "| seed002 | adaptive | 2.20 (2.00-2.40) | 3.20 (3.00-3.40) | 500 | 20.0 | 1.00x colocated, 2.00x 1p1d |"
    results = {"repeats": repeats, "arms": ["colocated", "1p1d", "adaptive"], "workloads": ["seed002"],
               "slo": {"ttft_ms": 2000.0, "itl_ms": 100.0}}  # fmt: skip
    table, plot = write_report(results, tmp_path / "adaptive_roles")
    assert table.read_text().startswith("Service levels: TTFT <= 2000 ms, TPOT <= 100 ms")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_arm_is_two_one_core_engines_and_only_the_roles_differ() -> None:
    for name, arm in ARMS.items():
        config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", **COMMON, **arm},
                              master_answers=lambda host, port: False)  # fmt: skip
        assert (config.devices_needed, config.using_prefix_connector, config.routing_policy) == (2, False, "kv_aware"), name
    adaptive = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", **COMMON, **ARMS["adaptive"]},
                            master_answers=lambda host, port: False)  # fmt: skip
    assert [(plan.role, plan.count) for plan in instance_plans(adaptive)] == [(Role.ADAPTIVE, 2)]
    assert (adaptive.planner.window_s, adaptive.planner.settle_s) == (10.0, 15.0)


def test_the_ramp_goes_low_up_high_down_and_ends_where_asked() -> None:
    total = 700.0  # sevenths of 100 s
    rates = [rate_at(t, total, 10.0, 0.2, 1.5, 0.5) for t in (0, 50, 100, 200, 300, 350, 400, 450, 500, 700)]
    assert rates == pytest.approx([2.0, 2.0, 2.0, 8.5, 15.0, 15.0, 15.0, 10.0, 5.0, 5.0])


def test_the_pool_capacity_grows_with_its_engines_and_the_inter_token_level() -> None:
    slo = SloConfig()
    assert pool_capacity(32, slo) == pytest.approx(2 * pool_capacity(16, slo))
    assert pool_capacity(32, SloConfig(itl_ms=200)) > pool_capacity(32, slo) > 0


def test_ramp_buckets_count_attainment_and_failures_by_when_requests_left() -> None:
    ramp = Ramp(answers=[Answer(1.0, 200, ttft_s=0.5, itl_s=0.05, tokens=32), Answer(2.0, 200, ttft_s=2.5, itl_s=0.05),
                         Answer(3.0, 429, error="busy"), Answer(12.0, 200, ttft_s=0.1, itl_s=0.2)],
                host=[{"t": 2.0, "busy_cores": 0.5, "late_s": 1.0, "decode_streams_max": 3},
                      {"t": 4.0, "busy_cores": 0.7, "late_s": 1.5, "decode_streams_max": 5},
                      {"t": 12.0, "busy_cores": 1.0, "late_s": 4.0, "decode_streams_max": 2}])  # fmt: skip
    rows = buckets(ramp, SloConfig(), 20.0, 10.0, lambda t: 5.0)
    assert rows == [{"t": 0.0, "load": 0.5, "sent": 3, "attainment": 1 / 3, "failed": 1, "itl_p50_ms": 50.0,
                     "busy_cores": pytest.approx(0.6), "engines_late_s": 0.5, "decode_streams_max": 5},
                    {"t": 10.0, "load": 0.5, "sent": 1, "attainment": 0.0, "failed": 0, "itl_p50_ms": 200.0,
                     "busy_cores": 1.0, "engines_late_s": 2.5, "decode_streams_max": 2}]  # fmt: skip


def test_the_store_holds_every_prompt_a_deployment_hands_over_twice() -> None:
    """With the default 2 GiB, seed 000's prompts filled the store within the first
    workload and every later handoff was computed by the decode engine instead."""
    # seed 000: 72 measured + 36 settling prompts of 1,400 + 280 tokens, 12,288 bytes a token, twice: 4,252 MiB
    assert store_mb(["seed000"], 0.5, 12288) == 4352
    assert store_mb(["seed002"], 0.5, 12288) == 2048  # small: the default
