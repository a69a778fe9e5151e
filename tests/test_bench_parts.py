"""The benchmark's own parts (not benchmarks): the grouped-prefix dataset generator, in
the served model's tokenizer, the parsing of ``vllm bench serve`` results, the table and
plot writers, and the door-overhead benchmark's aggregation, legs check and Uvicorn arm."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import uvicorn
from transformers import AutoTokenizer

from benchmarks.asgi_door import completions_app
from benchmarks.datasets import GroupedPrefixWorkload, grouped_prefix_prompts, token_count, write_custom_jsonl
from benchmarks.door_process import engine_info
from benchmarks.frontdoor_overhead import aggregate, compare, legs_check, rotated
from benchmarks.prefix_affinity import prediction
from benchmarks.report import Spread, markdown_table
from benchmarks.seed000 import TABLE_COLUMNS, write_report
from benchmarks.serve_bench import parse_result
from deploy.embedded_model import ensure_embedded_model
from door.builder import build_door
from testkit.helpers import PROJECT_ROOT, free_port, service_config
from tests.fake_engines import FakeEngine, serving


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(ensure_embedded_model(PROJECT_ROOT / ".cache" / "models"))


def _shared_head(tokenizer: object, a: str, b: str) -> int:
    ids_a, ids_b = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)  # type: ignore[attr-defined]
    return next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))


def test_grouped_prompts_have_exact_token_counts_and_share_exactly_their_group_prefix(tokenizer: object) -> None:
    workload = GroupedPrefixWorkload(groups=3, per_group=4, prefix_tokens=300, suffix_tokens=50, output_tokens=2, seed=7)
    prompts = grouped_prefix_prompts(tokenizer, workload)  # type: ignore[arg-type]
    assert sorted(group for group, _ in prompts) == [0] * 4 + [1] * 4 + [2] * 4
    assert {token_count(tokenizer, prompt) for _, prompt in prompts} == {350}  # type: ignore[arg-type]
    by_group = {g: [p for group, p in prompts if group == g] for g in range(3)}
    for members in by_group.values():  # the suffixes are random words: the first one differs
        assert {_shared_head(tokenizer, members[0], other) for other in members[1:]} <= {300, 301}
    assert _shared_head(tokenizer, by_group[0][0], by_group[1][0]) < 5


def test_the_same_seed_gives_the_same_prompts_in_the_same_order(tokenizer: object) -> None:
    workload = GroupedPrefixWorkload(groups=2, per_group=3, prefix_tokens=40, suffix_tokens=10, output_tokens=2, seed=1)
    first = grouped_prefix_prompts(tokenizer, workload)  # type: ignore[arg-type]
    assert grouped_prefix_prompts(tokenizer, workload) == first  # type: ignore[arg-type]
    other = GroupedPrefixWorkload(**{**workload.__dict__, "seed": 2})
    assert grouped_prefix_prompts(tokenizer, other) != first  # type: ignore[arg-type]
    assert [group for group, _ in first] != [0, 0, 0, 1, 1, 1]  # shuffled, not group by group


def test_a_workload_without_prompts_is_refused() -> None:
    with pytest.raises(ValueError, match="per_group must be at least 1, got 0"):
        GroupedPrefixWorkload(groups=2, per_group=0, prefix_tokens=40, suffix_tokens=10, output_tokens=2)


def test_custom_jsonl_is_what_vllm_bench_serve_reads(tmp_path: Path) -> None:
    path = write_custom_jsonl(tmp_path / "d" / "prompts.jsonl", ["a b", "c"], output_tokens=3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"prompt": "a b", "output_tokens": 3},
        {"prompt": "c", "output_tokens": 3},
    ]


def test_a_saved_vllm_bench_serve_result_is_parsed() -> None:
    saved = {
        "duration": 30.5, "completed": 35, "failed": 1, "num_prompts": 36, "request_throughput": 1.15,
        "output_throughput": 2.3, "total_token_throughput": 1934.0, "mean_ttft_ms": 2450.0, "median_ttft_ms": 2100.0,
        "p99_ttft_ms": 6200.0, "mean_tpot_ms": 40.0, "median_tpot_ms": 38.0, "p99_tpot_ms": 90.0,
        "mean_itl_ms": 40.0, "median_itl_ms": 38.0, "p99_itl_ms": 91.0, "mean_e2el_ms": 2500.0,
        "median_e2el_ms": 2150.0, "p99_e2el_ms": 6300.0, "std_ttft_ms": 1.0,
    }  # fmt: skip
    result = parse_result(saved)
    assert (result.completed, result.failed, result.duration_s) == (35, 1, 30.5)
    assert (result.request_throughput, result.mean_ttft_ms, result.p99_ttft_ms, result.p99_e2el_ms) == (1.15, 2450.0, 6200.0, 6300.0)
    assert parse_result({"completed": 2, "num_prompts": 3}).failed == 1  # older results have no "failed"


def test_spread_cells_and_markdown_table() -> None:
    assert Spread.of([0.41, 0.26, 0.39]) == Spread(0.39, 0.26, 0.41)
    assert Spread.of([0.41, 0.26, 0.39]).cell(2) == "0.39 (0.26-0.41)"
    assert Spread.of([8123.4]).cell(0) == "8123"
    assert markdown_table(["arm", "req/s"], [["a", "1.0"], ["b", "2.0"]]) == (
        "| arm | req/s |\n|---|---|\n| a | 1.0 |\n| b | 2.0 |\n"
    )
    with pytest.raises(ValueError, match="has 1 cells, the header 2"):
        markdown_table(["arm", "req/s"], [["a"]])


def test_seed000_report_writes_the_table_and_two_plots(tmp_path: Path) -> None:
    def run(req_s: float, ttft: float) -> dict[str, float]:
        figures = {key: 0.0 for key, _, _ in TABLE_COLUMNS}
        return {**figures, "request_throughput": req_s, "mean_ttft_ms": ttft}

    arms = {
        "colocated": {"runs": [run(0.5, 800), run(0.3, 900), run(0.4, 1000)], "failed_requests": 0, "store_call_failures": 0},
        "1p1d+reuse": {"runs": [run(0.6, 700)], "failed_requests": 1, "store_call_failures": 2},
    }
    written = write_report(arms, tmp_path / "seed000")  # type: ignore[arg-type]
    assert [path.name for path in written] == ["seed000.md", "seed000_req_s.png", "seed000_ttft.png"]
    lines = (tmp_path / "seed000.md").read_text().splitlines()
    assert lines[0].startswith("| arm | req/s | mean TTFT ms |") and lines[0].endswith("| failed requests | store calls failed or late |")
    assert lines[2].startswith("| colocated | 0.40 (0.30-0.50) | 900 (800-1000) |")
    assert lines[3].startswith("| 1p1d+reuse | 0.60 | 700 |") and lines[3].endswith("| 1 | 2 |")
    for plot in written[1:]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_door_overhead_rounds_become_spreads_and_added_latency_is_taken_round_by_round() -> None:
    def figures(p50: float, p99: float, req_s: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99, "mean_ms": p50, "req_s": req_s}

    rounds = [
        {"direct": figures(0.6, 1.0, 2000), "door": figures(1.1, 1.8, 1100), "router": figures(0.7, 1.2, 2200)},
        {"direct": figures(0.8, 1.0, 1800), "door": figures(1.2, 1.6, 1000), "router": figures(0.9, 1.1, 2000)},
        {"direct": figures(0.7, 1.0, 1900), "door": figures(1.3, 2.0, 1200), "router": figures(0.8, 1.3, 2400)},
    ]
    table = aggregate(rounds, {"direct": None, "door": "direct", "router": "direct"})
    assert set(table["direct"]) == {"p50_ms", "p99_ms", "mean_ms", "req_s"}
    assert table["door"]["req_s"] == Spread(1100, 1000, 1200)
    added = table["door"]["added_p50_ms"]  # 0.5, 0.4, 0.6: not median(door) - median(direct) alone
    assert (round(added.median, 6), round(added.low, 6), round(added.high, 6)) == (0.5, 0.4, 0.6)
    assert round(table["door"]["added_p99_ms"].high, 6) == 1.0

    versus = compare(rounds, "door", "router")
    assert round(versus["door_minus_router_added_p50_ms"].median, 6) == 0.4  # 0.4, 0.3, 0.5
    assert round(versus["door_over_router_req_s"].low, 6) == 0.5  # 1100/2200, 1000/2000, 1200/2400
    assert versus["met"] is False
    fast = [{**r, "door": figures(r["router"]["p50_ms"] + 0.05, 1.0, r["router"]["req_s"] * 1.1)} for r in rounds]
    assert compare(fast, "door", "router")["met"] is True


def test_door_overhead_legs_check_wants_every_request_prefilled_then_decoded_with_its_handover() -> None:
    before_p = {"requests": 10, "prefill_legs": 10, "decode_legs": 0, "handed_over_by": {}, "handovers_seen": 0}
    before_d = {"requests": 10, "prefill_legs": 0, "decode_legs": 10, "handed_over_by": {"p0": 10},
                "handovers_seen": 10}  # fmt: skip
    after_p = {**before_p, "requests": 15, "prefill_legs": 15}
    after_d = {**before_d, "requests": 15, "decode_legs": 15, "handed_over_by": {"p0": 15}, "handovers_seen": 15}
    assert legs_check(5, (before_p, after_p), (before_d, after_d), "p0")["ok"] is True
    # The decode got the request without the prefill's kv_transfer_params (sent in parallel, say).
    no_handover = {**after_d, "decode_legs": 10, "handed_over_by": {"p0": 10}, "handovers_seen": 10}
    check = legs_check(5, (before_p, after_p), (before_d, no_handover), "p0")
    assert check["ok"] is False and check["decode_legs_with_prefill_params"] == 0 and check["decode_requests"] == 5
    # The same handover reused for several decodes.
    reused = {**after_d, "handovers_seen": 11}
    assert legs_check(5, (before_p, after_p), (before_d, reused), "p0")["distinct_handovers"] == 1


def test_rotated_starts_each_round_with_another_arm() -> None:
    assert [rotated("abc", i) for i in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_door_process_engine_spec() -> None:
    assert engine_info("p0=prefill@20001") == {"name": "p0", "role": "prefill", "host": "127.0.0.1", "port": 20001,
                                               "state": "healthy"}  # fmt: skip
    with pytest.raises(ValueError, match="'p0=prefil@1' is invalid: write NAME=ROLE@PORT, ROLE one of prefill, decode"):
        engine_info("p0=prefil@1")


def test_prediction_compares_the_runs_deltas_per_engine_and_in_all() -> None:
    before = {"colocated-0": (100.0, 90.0), "colocated-1": (0.0, 0.0)}
    after = {"colocated-0": (1124.0, 1114.0), "colocated-1": (2048.0, 1920.0)}
    assert prediction(before, after) == {
        "per_engine": {"colocated-0": {"predicted": 1024.0, "reported": 1024.0},
                       "colocated-1": {"predicted": 2048.0, "reported": 1920.0}},
        "predicted": 3072.0, "reported": 2944.0, "predicted_over_reported": 1.043,
    }  # fmt: skip
    assert prediction(before, before)["predicted_over_reported"] is None  # nothing reported: no ratio


def test_the_door_on_uvicorns_httptools_answers_as_the_door_does() -> None:
    """The door-overhead benchmark's Uvicorn arm (benchmarks/asgi_door.py): the door's
    handlers as a bare ASGI callable; whole and streamed answers, the other paths by FastAPI."""
    engine = FakeEngine("c0", "colocated")
    door = build_door(service_config(ROUTING_POLICY="round_robin"), [engine.info], "m")
    port = free_port()
    config = uvicorn.Config(completions_app(door), host="127.0.0.1", port=port, http="httptools", log_level="warning")
    with serving(engine.app(), engine.port), serving(door.app, port, config):
        url = f"http://127.0.0.1:{port}"
        whole = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "r1"})
        assert whole.status_code == 200 and whole.headers["x-request-id"] == "r1"
        assert whole.json()["choices"][0]["text"] == "c0"
        streamed = httpx.post(f"{url}/v1/chat/completions", json={"messages": [], "stream": True})
        assert streamed.status_code == 200 and streamed.headers["content-type"] == "text/event-stream"
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.text.split("\n\n") if line.startswith("data: {")]
        assert texts == ["c0-0", "c0-1", "c0-2"] and streamed.text.endswith("data: [DONE]\n\n")
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "model": "other"})
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
        assert httpx.get(f"{url}/health").status_code == 200  # FastAPI's path


def test_sim_fidelity_pools_the_repeats_requests_and_compares_the_pooled_figures() -> None:
    from benchmarks.sim_fidelity import pooled, report

    def run(tpot: float, completed: int, duration: float) -> dict[str, float]:
        return {"mean_ttft_ms": 1000.0, "mean_tpot_ms": tpot, "request_throughput": completed / duration,
                "completed": completed, "duration_s": duration}  # fmt: skip

    real = [run(100.0, 16, 10.0), run(400.0, 16, 30.0), run(130.0, 32, 24.0)]
    assert pooled(real, "mean_tpot_ms") == (100 * 16 + 400 * 16 + 130 * 32) / 64  # 190.0
    assert pooled(real, "request_throughput") == 64 / 64.0
    simulated = [run(95.0, 16, 10.0), run(380.0, 16, 30.0), run(95.0, 32, 24.0)]  # median -27%, pooled -13%
    _, differences = report({"seed000": {"real": real, "simulated": simulated}})
    assert differences["seed000"]["mean_tpot_ms"] == round((95 * 16 + 380 * 16 + 95 * 32) / 64 / 190.0 - 1, 4)
    assert differences["seed000"]["mean_tpot_ms_of_medians"] == round(95 / 130 - 1, 4)
    assert differences["seed000"]["mean_ttft_ms"] == 0.0
