"""The role planner's decisions on recorded service-level series (pure: no engines).

The series are the door's 20 s windows as a load would produce them: seed 002's decode-heavy
load on colocated engines misses the inter-token level (prefills stall decodes; measured
228 ms p99 against 38.8 ms for 1P1D), seed 000's prompt-heavy load on 1P1D misses TTFT.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.config import PlannerConfig, SloConfig
from common.errors import ConfigError
from common.service_levels import ServiceLevels
from controller.adaptive_roles import AdaptiveRoles
from controller.role_layouts import initial_roles, layout_of
from controller.role_planner import RolePlanner, Seen, split_prefill

SLO = SloConfig(ttft_ms=2000, itl_ms=100)
WINDOW = 20.0


def window(ttft_ms: float, itl_ms: float, requests: int = 40, met: int | None = None,
           in_flight: dict[str, int] | None = None) -> ServiceLevels:  # fmt: skip
    met = requests if met is None else met
    return ServiceLevels(window_s=WINDOW, requests=requests, met=met, missed_ttft=0, missed_itl=requests - met,
                         missed_both=0, ttft_p90_ms=ttft_ms, itl_p90_ms=itl_ms, in_flight=in_flight or {})  # fmt: skip


def replay(planner: RolePlanner, roles: dict[str, str], series: list[ServiceLevels], start: float = 1000.0,
           every: float = 5.0) -> list[tuple[float, dict[str, str], dict[str, tuple[str, str]]]]:  # fmt: skip
    """Feed the windows ``every`` seconds apart, applying role changes; (when, roles after, moved) per decision."""
    decisions = []
    for index, levels in enumerate(series):
        now = start + index * every
        decision = planner.decide(levels, roles, now)
        if decision is not None:
            if decision.moved:
                roles = dict(decision.roles)
            decisions.append((now, dict(decision.roles), decision.moved))
    return decisions


def test_initial_roles_follow_the_configured_split() -> None:
    names = ["adaptive-0", "adaptive-1", "adaptive-2"]
    assert initial_roles(names, 1, 2) == {"adaptive-0": "prefill", "adaptive-1": "decode", "adaptive-2": "decode"}
    assert initial_roles(names, 3, 0) == {name: "colocated" for name in names}


def test_inter_token_misses_on_colocated_engines_split_them_once() -> None:
    planner = RolePlanner(SLO)
    roles = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    # seed 002 on colocated engines, then (after the split) the same load met
    series = [window(600, 228, met=10, in_flight={"adaptive-0": 5, "adaptive-1": 3})] * 6 + [window(700, 39)] * 12
    decisions = replay(planner, roles, series)
    assert decisions == [(1000.0, {"adaptive-0": "decode", "adaptive-1": "prefill"},
                          {"adaptive-0": ("colocated", "decode"), "adaptive-1": ("colocated", "prefill")})]  # fmt: skip


def test_nothing_changes_while_both_levels_are_met_or_answers_are_few() -> None:
    planner = RolePlanner(SLO, min_requests=10)
    roles = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    assert replay(planner, roles, [window(1999, 100)] * 10 + [window(9000, 900, requests=9)] * 10) == []


def test_a_new_layout_is_judged_only_on_a_window_of_its_own() -> None:
    planner = RolePlanner(SLO, settle_s=30.0)
    roles = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    assert planner.decide(window(500, 300, met=10), roles, now=0.0) is not None  # split at t=0
    split = {"adaptive-0": "prefill", "adaptive-1": "decode"}
    for now in (5.0, 10.0, 25.0, 29.9):  # the windows still hold colocated answers; then settling
        assert planner.decide(window(3000, 50), split, now) is None
    # the first window holds the change's own transition (seed 000's: the prefill engine's cache filling): no move
    for now in (30.0, 49.9):
        assert planner.decide(window(3000, 50, met=5), split, now) is None
    decision = planner.decide(window(3000, 50, met=5), split, now=50.0)  # worse than colocated (25%)
    assert decision is not None and decision.roles == {"adaptive-0": "colocated", "adaptive-1": "colocated"}


def test_prompt_queues_on_a_split_pool_move_the_idlest_decode_engine_to_prefill() -> None:
    planner = RolePlanner(SLO)
    roles = {"adaptive-0": "prefill", "adaptive-1": "decode", "adaptive-2": "decode", "adaptive-3": "decode"}
    busy = {"adaptive-1": 4, "adaptive-2": 1, "adaptive-3": 6}
    decisions = replay(planner, roles, [window(3500, 40, met=5, in_flight=busy)] + [window(1200, 60)] * 10)
    assert decisions[0][2] == {"adaptive-2": ("decode", "prefill")}
    # 2P+2D meets both levels: all colocated, never seen on this workload, is tried once (30 s to settle)
    assert [(when, layout_of(roles)) for when, roles, _ in decisions[1:]] == [(1030.0, (0, 0, 4))]


def test_decode_misses_with_several_prefill_engines_move_one_back() -> None:
    planner = RolePlanner(SLO)
    roles = {"adaptive-0": "prefill", "adaptive-1": "prefill", "adaptive-2": "decode"}
    decisions = replay(planner, roles, [window(800, 180, met=12, in_flight={"adaptive-0": 2, "adaptive-1": 0})])
    assert [moved for _, _, moved in decisions] == [{"adaptive-1": ("prefill", "decode")}]


def test_the_worse_level_decides_when_both_are_missed() -> None:
    roles = {"adaptive-0": "prefill", "adaptive-1": "decode", "adaptive-2": "decode"}
    ttft_worse = replay(RolePlanner(SLO), roles, [window(6000, 150, met=0)])  # 3.0x against 1.5x
    assert [moved for _, _, moved in ttft_worse] == [{"adaptive-1": ("decode", "prefill")}]
    roles = {"adaptive-0": "prefill", "adaptive-1": "prefill", "adaptive-2": "decode"}
    itl_worse = replay(RolePlanner(SLO), roles, [window(2500, 400, met=0)])  # 1.25x against 4x
    assert [moved for _, _, moved in itl_worse] == [{"adaptive-0": ("prefill", "decode")}]


def test_no_flapping_between_two_layouts_that_both_miss() -> None:
    """Colocated misses inter-token latency (1.2 answers/s met), split misses TTFT (0.6/s):
    the planner splits once, goes back to colocated once, then stays and says more engines
    are needed."""
    planner = RolePlanner(SLO, settle_s=30.0, memory_s=600.0)
    roles = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    colocated, split = window(900, 250, met=24), window(4000, 40, met=12)
    t, decisions = 0.0, []
    for _ in range(60):  # 5 minutes of windows, 5 s apart
        decision = planner.decide(colocated if layout_of(roles)[2] else split, roles, t)
        if decision is not None:
            decisions.append((t, decision.moved, decision.reason))
            roles = dict(decision.roles) if decision.moved else roles
        t += 5.0
    moves = [(when, moved) for when, moved, _ in decisions if moved]
    assert [when for when, _ in moves] == [0.0, 50.0]
    assert layout_of(roles) == (0, 0, 2)
    advice = [(when, reason) for when, moved, reason in decisions if not moved]
    assert [when for when, _ in advice] == [80.0, 110.0, 140.0, 170.0, 200.0, 230.0, 260.0, 290.0]
    assert "1P+1D met both levels at 0.60 answers/s 30 s ago, no better" in advice[0][1]
    assert advice[0][1].endswith("more engines needed")


def test_a_remembered_layout_is_tried_again_once_forgotten() -> None:
    planner = RolePlanner(SLO, settle_s=30.0, memory_s=120.0)
    roles = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    planner.decide(window(900, 250, met=24), roles, 0.0)  # split
    split = {"adaptive-0": "prefill", "adaptive-1": "decode"}
    planner.decide(window(4000, 40, met=12), split, 30.0)  # back
    assert not planner.decide(window(900, 250, met=24), roles, 60.0).moved  # type: ignore[union-attr]
    again = planner.decide(window(900, 250, met=24), roles, 151.0)  # 1P+1D judged at 30 s: forgotten after 150 s
    assert again is not None and again.moved == {"adaptive-0": ("colocated", "prefill"), "adaptive-1": ("colocated", "decode")}


def test_operator_roles_are_checked_and_scale_steps_keep_the_pool_valid() -> None:
    roles = AdaptiveRoles(["adaptive-0", "adaptive-1"], prefill=1, decode=1, slo=SLO, planner=PlannerConfig())
    with pytest.raises(ConfigError, match="adaptive-7 are not adaptive engines"):
        roles.set({"adaptive-7": "decode"}, "test", 0.0)
    with pytest.raises(ConfigError, match="role 'both' for adaptive-0 is invalid: must be one of prefill, decode, colocated"):
        roles.set({"adaptive-0": "both"}, "test", 0.0)
    with pytest.raises(ConfigError, match="roles 2D are invalid"):
        roles.set({"adaptive-0": "decode"}, "test", 0.0)
    decision = roles.set({"adaptive-0": "colocated", "adaptive-1": "colocated"}, "test", 0.0)
    assert decision.moved == {"adaptive-0": ("prefill", "colocated"), "adaptive-1": ("decode", "colocated")}
    roles.added(["adaptive-2"], 1.0)
    assert roles.acting["adaptive-2"] == "colocated"
    with pytest.raises(ConfigError, match="roles 1P\\+1D\\+1C are invalid: colocated engines"):
        roles.set({"adaptive-0": "prefill", "adaptive-1": "decode"}, "test", 2.0)
    roles.set({"adaptive-0": "prefill", "adaptive-1": "decode", "adaptive-2": "decode"}, "test", 2.0)
    roles.added(["adaptive-3"], 3.0)
    assert roles.acting == {"adaptive-0": "prefill", "adaptive-1": "decode", "adaptive-2": "decode", "adaptive-3": "decode"}
    for name in ("adaptive-1", "adaptive-2", "adaptive-3"):
        roles.removed(name, 4.0)
    assert roles.acting == {"adaptive-0": "colocated"}  # the last decode engine went: the rest serve whole requests
    assert [d["reason"] for d in roles.decisions] == ["test", "test"]  # the refused ones left no trace


def test_over_capacity_the_planner_adds_engines_up_to_its_limit_then_says_so() -> None:
    planner = RolePlanner(SLO, settle_s=30.0, max_engines=5)
    roles = {f"adaptive-{i}": "colocated" for i in range(2)}
    decisions = []
    for step in range(16):  # prompts queue on every layout: 80 s of windows 5 s apart
        now = step * 5.0
        decision = planner.decide(window(4000, 60, met=8), roles, now)
        if decision is not None:
            decisions.append((now, decision.scale, bool(decision.moved)))
            for _ in range(decision.scale):  # the scale path adds them: colocated ones in a colocated pool
                roles = {**roles, f"adaptive-{len(roles)}": "colocated"}
    # TTFT 2x its level: 2 engines more (as many as there are), then the last one allowed, then advice every 30 s
    assert decisions == [(0.0, 2, False), (30.0, 1, False), (60.0, 0, False)]
    assert len(roles) == 5


def test_new_engines_take_the_role_that_is_short() -> None:
    roles = AdaptiveRoles([f"adaptive-{i}" for i in range(4)], prefill=1, decode=3, slo=SLO,
                          planner=PlannerConfig(max_engines=8))  # fmt: skip
    roles.planner.max_engines = 0
    roles.set(dict.fromkeys(roles.acting, "colocated"), "test", 0.0)
    assert roles.observe(window(3000, 60, met=5), 100.0) is not None  # 4C: 0.25 answers/s, more engines needed
    roles.planner.max_engines = 8
    roles.set({"adaptive-0": "prefill", "adaptive-1": "prefill", "adaptive-2": "prefill", "adaptive-3": "decode"},
              "test", 101.0)  # fmt: skip
    # 3P+1D, TTFT 1.5x: all colocated did worse; ceil(4 x 0.5) = 2 prefill engines more
    decision = roles.observe(window(3000, 60, met=10), 200.0)
    assert decision is not None and decision.scale == 2 and "adding 2 prefill engine(s) (4 -> 6" in decision.reason
    roles.added(["adaptive-4", "adaptive-5"], 201.0)
    assert layout_of(roles.acting) == (5, 1, 0)
    roles.added(["adaptive-6"], 202.0)  # an operator's: decode, as before
    assert roles.acting["adaptive-6"] == "decode"


def test_with_room_to_spare_the_planner_removes_engines_down_to_its_floor() -> None:
    planner = RolePlanner(SLO, settle_s=30.0, min_engines=2, max_engines=8)
    roles = {f"adaptive-{i}": "colocated" for i in range(4)}
    removed = []
    for step in range(40):
        now = step * 5.0
        decision = planner.decide(window(600, 30), roles, now)  # both p90s under half their levels, all met
        if decision is not None:
            assert decision.scale == -1 and "removing an engine" in decision.reason
            gone = max(roles, key=lambda name: int(name.rsplit("-", 1)[1]))
            removed.append((now, gone))
            roles = {name: role for name, role in roles.items() if name != gone}
    # room for 3 windows (60 s) in a row, each time: the first at 60 s, the next 30 s to settle + 60 s later
    assert removed == [(60.0, "adaptive-3"), (150.0, "adaptive-2")]
    assert planner.decide(window(1100, 30), {"a-0": "colocated", "a-1": "colocated", "a-2": "colocated"}, 300.0) is None


def test_one_window_without_room_restarts_the_count_before_an_engine_goes() -> None:
    planner = RolePlanner(SLO, settle_s=10.0, min_engines=2, max_engines=8)
    roles = {f"adaptive-{i}": "colocated" for i in range(4)}
    series = [window(600, 30)] * 8 + [window(1500, 30)] + [window(600, 30)] * 12 + [window(600, 30)]
    scaled = [(index * 5.0, d.scale) for index, levels in enumerate(series)
              if (d := planner.decide(levels, roles, index * 5.0)) is not None]  # fmt: skip
    assert scaled == [(105.0, -1)]  # not at 60 s (a busy window at 40 s): 60 s after the quiet ones began again at 45 s


def test_no_engine_is_removed_where_the_smaller_pool_did_worse() -> None:
    planner = RolePlanner(SLO, settle_s=30.0, min_engines=2, max_engines=4)
    three = {f"adaptive-{i}": "colocated" for i in range(3)}
    assert planner.decide(window(2500, 60, met=20), three, 0.0).scale == 1  # type: ignore[union-attr]
    four = {**three, "adaptive-3": "colocated"}
    for now in (30.0, 60.0, 95.0):  # 3 engines met 50%, 4 meet 100%: keep 4
        assert planner.decide(window(500, 20), four, now) is None
    assert planner.decide(window(500, 20), four, 700.0).scale == -1  # type: ignore[union-attr]  # forgotten


def test_a_colocated_pool_splits_by_the_measured_work() -> None:
    planner = RolePlanner(SLO)
    roles = {f"adaptive-{i}": "colocated" for i in range(10)}
    # 100 answers in 20 s (5/s), each prompt ~1 s: 5 engines busy, 6 at 85%; 4 decode
    levels = replace(window(1500, 150, requests=100, met=10, in_flight={name: 5 for name in roles}),
                     ttft_p50_ms=1000.0)  # fmt: skip
    decision = planner.decide(levels, roles, 0.0)
    assert decision is not None and layout_of(decision.roles) == (6, 4, 0) and "splitting 6P+4D" in decision.reason
    assert split_prefill(10, replace(levels, ttft_p50_ms=4000.0)) == 9  # one decode engine stays
    assert split_prefill(10, replace(levels, ttft_p50_ms=0.0)) == 1  # nothing measured


def test_with_engines_to_add_a_split_pool_short_of_both_roles_grows() -> None:
    planner = RolePlanner(SLO, max_engines=12)
    roles = {f"adaptive-{i}": "prefill" if i < 6 else "decode" for i in range(8)}
    decision = planner.decide(window(3000, 90, met=5), roles, 0.0)  # TTFT 1.5x, inter-token 0.9x: no decode to spare
    assert decision is not None and not decision.moved and decision.scale == 4
    assert "neither role has engines to spare" in decision.reason and planner.new_role == "prefill"
    # a split from colocated that did better: still more engines (under a rising load the window before was lighter)
    planner = RolePlanner(SLO, settle_s=10.0, max_engines=12)
    split = planner.decide(window(900, 150, met=30), dict.fromkeys(roles, "colocated"), 0.0)
    assert split is not None and split.moved
    grow = planner.decide(window(2300, 140, met=10), split.roles, 30.0)
    assert grow is not None and grow.scale == 4 and not grow.moved and "4 decode" in grow.reason  # ceil(8 x 0.4)
    planner = RolePlanner(SLO)  # engines may not be added: the decode engines are moved as before
    decision = planner.decide(window(3000, 90, met=5), roles, 0.0)
    assert decision is not None and layout_of(decision.roles) == (7, 1, 0)


def test_layouts_compare_only_on_the_same_workload() -> None:
    """Seen on 2 real engines: colocated's goodput on seed 000 (2 tokens out) kept the pool
    split on seed 002 (128 out), where colocated serves more. A split pool meeting both
    levels tries colocated once per workload; a remembered goodput counts only on its own."""
    planner = RolePlanner(SLO, settle_s=30.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    split = planner.decide(replace(window(1500, 220, met=26), output_tokens=2.0), colocated, 0.0)  # 1.3/s
    assert split is not None and layout_of(split.roles) == (1, 1, 0)
    assert planner.decide(replace(window(1200, 40, met=40), output_tokens=2.0), split.roles, 30.0) is None
    probe = planner.decide(replace(window(1200, 40, requests=17), output_tokens=128.0), split.roles, 60.0)
    assert probe is not None and probe.roles == colocated and "trying all colocated" in probe.reason
    assert planner.decide(replace(window(800, 60, requests=30), output_tokens=128.0), colocated, 90.0) is None


def test_a_large_pool_moves_engines_in_proportion_to_how_far_a_level_is_over() -> None:
    planner = RolePlanner(SLO, settle_s=30.0)
    roles = {f"adaptive-{i:02d}": "prefill" if i < 2 else "decode" for i in range(16)}
    decision = planner.decide(window(5000, 40, met=4), roles, 0.0)  # TTFT 2.5x its level: 2 prefill engines -> 5
    assert decision is not None and layout_of(decision.roles) == (5, 11, 0)
    decision = planner.decide(window(9000, 40, met=4), decision.roles, 50.0)  # 4.5x, taken as 3x: 5 -> 15, one decode left
    assert decision is not None and layout_of(decision.roles) == (15, 1, 0)
    decision = planner.decide(window(1000, 150, met=20), decision.roles, 100.0)  # inter-token 1.5x on 1 decode: +1
    assert decision is not None and layout_of(decision.roles) == (14, 2, 0)


def test_when_no_rule_applies_the_layout_before_is_gone_back_to_if_it_did_better() -> None:
    """Seen on 2 real engines (seed 000's load): colocated missed inter-token latency, so the
    pool split; the split missed inter-token latency worse still, where no rule moves an
    engine (one prefill engine is the least): it goes back, since colocated served more
    answers meeting both levels; then it stays (the split did worse)."""
    planner = RolePlanner(SLO, settle_s=30.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    split = planner.decide(window(1500, 220, requests=60, met=30), colocated, 0.0)  # 1.5 answers/s met
    assert split is not None and layout_of(split.roles) == (1, 1, 0)
    back = planner.decide(window(3700, 800, requests=20, met=6), split.roles, 50.0)  # 0.3/s: inter-token 8x, TTFT 1.9x
    assert back is not None and back.roles == colocated
    assert back.reason.endswith("one prefill engine is the least a split pool has; back to 2C: it met both levels at "
                                "1.50 answers/s 50 s ago")  # fmt: skip
    stay = planner.decide(window(1500, 220, requests=60, met=30), colocated, 100.0)
    assert stay is not None and not stay.moved and "1P+1D met both levels at 0.30 answers/s" in stay.reason


def test_answers_waiting_for_decode_slots_move_idle_prefill_engines_to_decode() -> None:
    """Seen in the ramp on simulated engines: 31P+1D, the door admitting only as many
    requests as the one decode engine may hold; TTFT read 15 s while the prefill engines
    sat idle. More prefill engines would not help; more decode ones do."""
    planner = RolePlanner(SLO)
    roles = {f"adaptive-{i}": "prefill" if i < 6 else "decode" for i in range(8)}
    in_flight = {**{f"adaptive-{i}": 0 for i in range(4)}, "adaptive-4": 1, "adaptive-5": 1, "adaptive-6": 16, "adaptive-7": 16}
    decision = planner.decide(window(4000, 50, met=5, in_flight=in_flight), roles, 0.0)  # TTFT 2x: ceil(2 x 1) = 2
    assert decision is not None and layout_of(decision.roles) == (4, 4, 0)
    assert set(decision.moved) == {"adaptive-0", "adaptive-1"} and "answers wait for decode slots" in decision.reason
    # a prefill engine holding one each (the door lends whole requests to idle decode engines then): prompts queue
    busy = {**{f"adaptive-{i}": 1 for i in range(6)}, "adaptive-6": 16, "adaptive-7": 16}
    decision = RolePlanner(SLO).decide(window(4000, 50, met=5, in_flight=busy), roles, 0.0)
    assert decision is not None and layout_of(decision.roles) == (7, 1, 0)
    # with engines to add and neither role to spare (inter-token at 0.9x its level), the new engines decode
    planner = RolePlanner(SLO, max_engines=12)
    decision = planner.decide(window(4000, 90, met=5, in_flight=in_flight), roles, 0.0)
    assert decision is not None and decision.scale == 4 and "adding 4 decode engine(s)" in decision.reason


def test_when_no_layout_met_the_levels_the_one_that_served_more_did_better() -> None:
    planner = RolePlanner(SLO, settle_s=10.0)
    split = {f"adaptive-{i}": "prefill" if i < 3 else "decode" for i in range(4)}
    colocated = dict.fromkeys(split, "colocated")
    planner.decide(window(15000, 400, requests=160, met=0), colocated, 0.0)  # 8 answers/s, none met: no move helps
    # 3P+1D: none met either, 1 answer/s, one decode engine left: all colocated served more, so it is gone back to
    # (compared by goodput alone, 0 against 0, it read "no better" and the pool stayed on its one decode engine)
    decision = planner.decide(window(15000, 400, requests=20, met=0), split, 100.0)
    assert decision is not None and decision.roles == colocated


def test_a_workload_that_returns_gets_the_layout_that_served_it_best_at_once() -> None:
    """bench adaptive-roles' switching load: seed 000's phases (2 tokens out) last about
    7 s, shorter than a window and its settling. The requests arriving say what they ask
    for; the planner goes back to the layout that served that workload best at once, with
    no answers of it yet and in its settling time."""
    planner = RolePlanner(SLO, settle_s=30.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    short = dict(output_tokens=2.0, arriving_tokens=2.0)
    long = dict(output_tokens=256.0, arriving_tokens=256.0)
    # seed 000: colocated misses the inter-token level and splits; split serves it best
    split = planner.decide(replace(window(1500, 220, met=26), **short), colocated, 0.0)
    assert split is not None and layout_of(split.roles) == (1, 1, 0)
    assert planner.decide(replace(window(800, 40, met=40), **short), split.roles, 30.0) is None  # judged: 2/s
    assert planner.decide(replace(window(1200, 40, requests=17), **long), split.roles, 60.0) is None  # new: settling
    probe = planner.decide(replace(window(1200, 40, requests=17), **long), split.roles, 95.0)
    assert probe is not None and probe.roles == colocated  # long outputs: colocated tried, and judged
    assert planner.decide(replace(window(1200, 40, requests=24), **long), colocated, 130.0) is None  # served more
    # seed 000 arrives again: split at once, though its window holds no answer of it yet
    returned = planner.decide(replace(window(1200, 40, requests=3), output_tokens=256.0, arriving_tokens=2.0),
                              colocated, 135.0)  # fmt: skip
    assert returned is not None and returned.roles == split.roles
    assert returned.reason.startswith("the arriving requests ask for about 2 tokens out, not 256: back to 1P+1D")
    # the long outputs return within the settling time: colocated at once
    back = planner.decide(replace(window(800, 40, requests=12), output_tokens=2.0, arriving_tokens=256.0),
                          returned.roles, 140.0)  # fmt: skip
    assert back is not None and back.roles == colocated
    # the same workload arriving moves nothing; nor does a workload never judged
    assert planner.decide(replace(window(800, 40, requests=3), arriving_tokens=300.0), colocated, 145.0) is None
    assert planner.decide(replace(window(800, 40, requests=3), arriving_tokens=40.0), colocated, 150.0) is None
    assert planner.decide(replace(window(800, 40, requests=3), arriving_tokens=48.0), colocated, 155.0) is None


def test_a_workload_is_gone_back_to_only_on_as_many_engines_within_recall_s() -> None:
    planner = RolePlanner(SLO, settle_s=30.0, recall_s=600.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    short = dict(output_tokens=2.0, arriving_tokens=2.0)
    split = planner.decide(replace(window(1500, 220, met=26), **short), colocated, 0.0)
    assert split is not None
    assert planner.decide(replace(window(800, 40, met=40), **short), split.roles, 30.0) is None
    long = replace(window(1200, 40, requests=17), output_tokens=256.0, arriving_tokens=256.0)
    assert planner.decide(long, split.roles, 60.0) is None  # a new workload: settling
    probe = planner.decide(long, split.roles, 95.0)
    assert probe is not None and probe.roles == colocated
    three = {**colocated, "adaptive-2": "colocated"}
    assert planner.decide(replace(window(800, 40, requests=3), arriving_tokens=2.0), three, 100.0) is None
    late = RolePlanner(SLO, settle_s=30.0, recall_s=600.0)
    late._history, late._serving = planner._history, 256.0
    assert late.decide(replace(window(800, 40, requests=3), arriving_tokens=2.0), colocated, 700.0) is None


def test_with_engines_to_add_a_role_gives_only_the_engines_its_level_spares() -> None:
    """bench adaptive-ramp: 15P+8D with TTFT p90 2.5x its level and inter-token p90 at 75%
    of its own gave 7 decode engines to prefill; the one left missed its level 2x."""
    roles = {f"adaptive-{i}": "prefill" if i < 15 else "decode" for i in range(23)}
    ramp = window(5048, 75, met=72, requests=183)
    decision = RolePlanner(SLO, max_engines=32).decide(ramp, roles, 0.0)
    assert decision is not None and layout_of(decision.roles) == (17, 6, 0)  # floor(8 x 0.25) = 2 moved
    fixed = RolePlanner(SLO).decide(ramp, roles, 0.0)  # engines may not be added: as before
    assert fixed is not None and layout_of(fixed.roles) == (22, 1, 0)
    few = {f"adaptive-{i}": "prefill" if i < 6 else "decode" for i in range(8)}  # 2 decode engines at 70%: none spare
    tight = RolePlanner(SLO, max_engines=32).decide(window(5048, 70, met=72, requests=183), few, 0.0)
    assert tight is not None and tight.scale == 8 and not tight.moved and "none to spare" in tight.reason
    # at the limit too: the ramp's tail, 8P+24D, TTFT 25 s and inter-token p90 44 ms: 13 of 24 decode engines go
    full = {f"adaptive-{i}": "prefill" if i < 8 else "decode" for i in range(32)}
    decision = RolePlanner(SLO, max_engines=32).decide(window(25137, 44, met=5, requests=205), full, 0.0)
    assert decision is not None and layout_of(decision.roles) == (21, 11, 0)
    # the other way: decodes miss, the prefill engines spare floor(6 x (1 - 0.5)) = 3 of the ceil(2 x 1.5) = 3 asked
    roles = {f"adaptive-{i}": "prefill" if i < 6 else "decode" for i in range(8)}
    decision = RolePlanner(SLO, max_engines=32).decide(window(1000, 250, met=10), roles, 0.0)
    assert decision is not None and layout_of(decision.roles) == (3, 5, 0)


def test_a_split_pool_at_the_edge_of_the_levels_does_not_try_colocated() -> None:
    """On the ramp 22P+9D met both levels with 92% of its answers at 1.15x the load; trying
    colocated there cost a window of misses (TTFT 2.8 s, inter-token 194 ms)."""
    split = {"adaptive-0": "prefill", "adaptive-1": "decode"}
    assert RolePlanner(SLO).decide(window(1958, 67, met=254, requests=276), split, 0.0) is None
    probe = RolePlanner(SLO).decide(window(1958, 67, met=276, requests=276), split, 0.0)
    assert probe is not None and layout_of(probe.roles) == (0, 0, 2)


def test_a_window_of_a_change_under_way_is_not_recalled_for_the_arriving_workload() -> None:
    """bench adaptive-roles' switching load: a window on 1P+1D held seed 000's answers (2
    tokens out) while long outputs (256) arrived; remembered as 1P+1D serving the long
    outputs, it kept the next long phase on 1P+1D."""
    planner = RolePlanner(SLO, settle_s=30.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    split = {"adaptive-0": "prefill", "adaptive-1": "decode"}
    long = dict(output_tokens=256.0, arriving_tokens=256.0)
    assert planner.decide(replace(window(1500, 40, requests=12), **long), colocated, 0.0) is None  # long: colocated
    planner.changed(10.0)  # an operator split the pool
    # judged on 1P+1D: seed 000's answers, long outputs arriving (26 answers: more than colocated's 12)
    planner.decide(replace(window(1300, 40, requests=26), output_tokens=2.0, arriving_tokens=256.0), split, 40.0)
    planner.changed(90.0)  # split again by hand
    assert planner.decide(replace(window(1300, 40, requests=3), output_tokens=2.0, arriving_tokens=2.0), split, 100.0) \
        is None  # seed 000 arrives: never judged on it
    back = planner.decide(replace(window(1300, 40, requests=3), **long), split, 105.0)
    assert back is not None and back.roles == colocated  # not 1P+1D, from the window of the change


def test_a_layout_seen_on_this_workload_is_remembered_behind_a_later_window_on_another() -> None:
    """Colocated seen on seed 000, then on long outputs: back on seed 000 the split pool does
    not try colocated again (it was seen on this workload within the memory)."""
    planner = RolePlanner(SLO, settle_s=30.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    split = planner.decide(replace(window(1500, 220, met=26), output_tokens=2.0), colocated, 0.0)
    assert split is not None
    probe = planner.decide(replace(window(1200, 40, requests=17), output_tokens=256.0), split.roles, 30.0)
    assert probe is not None and probe.roles == colocated
    assert planner.decide(replace(window(1200, 40, requests=17), output_tokens=256.0), colocated, 65.0) is None
    assert planner.decide(replace(window(900, 40), output_tokens=2.0), split.roles, 70.0) is None


def test_after_a_new_workload_arrives_windows_are_judged_only_after_settling() -> None:
    """bench adaptive-roles' switching load: a window of seed 000's answers on colocated
    engines (inter-token p90 204 ms) split the pool just as long outputs arrived, and the
    long phase was served 1P+1D."""
    planner = RolePlanner(SLO, settle_s=15.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    assert planner.decide(replace(window(1500, 40, requests=12), output_tokens=256.0, arriving_tokens=256.0),
                          colocated, 0.0) is None  # fmt: skip
    # seed 000 arrives (never judged on it: nothing to go back to), then its answers' window
    assert planner.decide(replace(window(700, 40, requests=3), output_tokens=256.0, arriving_tokens=2.0),
                          colocated, 100.0) is None  # fmt: skip
    assert planner.decide(replace(window(700, 204, met=6), output_tokens=2.0, arriving_tokens=2.0), colocated, 110.0) is None
    split = planner.decide(replace(window(700, 204, met=6), output_tokens=2.0, arriving_tokens=2.0), colocated, 121.0)
    assert split is not None and layout_of(split.roles) == (1, 1, 0)  # judged once settled (and a window passed)


def test_a_window_the_client_paused_in_neither_decides_nor_is_remembered() -> None:
    """bench adaptive-roles at 5cece1b: seed 000 split the pool; the first window after
    settling held 10 answers in 13.7 s, most of it the gap between two ``vllm bench
    serve`` runs (8 of 10 met, TTFT p90 2.25 s), and sent the pool back to colocated
    (2.10 answers/s met), where it stayed: 1P+1D was remembered at 0.58/s."""
    planner = RolePlanner(SLO, settle_s=15.0)
    colocated = {"adaptive-0": "colocated", "adaptive-1": "colocated"}
    seed000 = replace(window(1471, 783, requests=43, met=21), window_s=10.0, output_tokens=2.0, arriving_tokens=2.0)
    split = planner.decide(seed000, colocated, 0.0)
    assert split is not None and layout_of(split.roles) == (1, 1, 0)
    paused = replace(seed000, window_s=13.7, requests=10, met=8, ttft_p90_ms=2251, itl_p90_ms=50, idle_s=8.0)
    assert planner.decide(paused, split.roles, 15.0) is None
    # the load back: 1P+1D misses TTFT a little, but meets both for more answers a second than colocated did
    steady = replace(paused, window_s=10.0, requests=28, met=25, ttft_p90_ms=2240, idle_s=0.0)
    stays = planner.decide(steady, split.roles, 30.0)
    assert stays is not None and stays.moved == {}
    assert "2C met both levels at 2.10 answers/s 30 s ago, no better" in stays.reason
    # met, but paused: judged (nothing to change) and not remembered as what 1P+1D serves
    assert planner.decide(replace(steady, met=28, requests=28, ttft_p90_ms=1500, idle_s=6.0), split.roles, 45.0) is None
    assert planner._recall((1, 1, 0), steady, 50.0) == Seen(2.5, 2.8, 30.0, 2.0, 2.0)
