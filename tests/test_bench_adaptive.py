"""The adaptive-roles benchmark's arithmetic and table (pure: no engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.adaptive_roles import ARMS, COMMON, combined, report_table, write_report
from benchmarks.serve_bench import ServeResult
from common.config import Role
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
