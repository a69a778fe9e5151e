"""Scale operations without a deployment: where new instances go and what they are named
(controller/scale_plan.py), which instances a scale-in takes, and the Scaler's steps
against a recording Controller and door (the door itself: tests/test_frontdoor_admin.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from common.config import Role
from common.errors import ConfigError, StartupError
from common.scale_port import ScaleBusy, parse_delta
from controller.placement import plan_engines
from controller.scale_plan import adopted_specs, instances_to_remove, next_indices, place_more, resolve_role
from controller.scaling import Scaler
from deploy.config import build_config
from workers.engine_process import EngineSpec

MODEL = Path("/models/m")
WORKERS = ("127.0.0.1:31501", "127.0.0.1:31502")


def _specs(settings: dict[str, str], cores: tuple[int, ...] = (0, 1, 2, 3)) -> tuple[object, list[EngineSpec]]:
    config = build_config({"ACCELERATOR": "cpu", **settings})
    return config, plan_engines(config, MODEL, "m", WORKERS, cores=cores)


# --- placement of new instances -------------------------------------------------------


def test_scale_out_takes_a_free_core_the_next_name_and_the_least_used_worker() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-3"})
    assert [(s.name, s.devices, s.ds_worker_address) for s in specs] == [
        ("prefill-0", (0,), WORKERS[0]), ("decode-0", (1,), WORKERS[1])]  # fmt: skip
    more = place_more(config, Role.DECODE, next_indices(Role.DECODE, specs, 1), specs, WORKERS, (0, 1, 2, 3))  # type: ignore[arg-type]
    assert [(p.name, p.instance, p.devices, p.ds_worker_address) for p in more.placements] == [
        ("decode-1", "decode-1", (2,), WORKERS[0])]  # fmt: skip
    assert more.shared_cores == ()


def test_scale_out_of_a_dp_instance_names_its_ranks_and_skips_used_cores() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-5", "DDP": "2"})
    assert [(s.name, s.devices) for s in specs] == [("prefill-0", (0,)), ("decode-0-dp0", (1,)), ("decode-0-dp1", (2,))]
    more = place_more(config, Role.DECODE, [1], specs, WORKERS, range(6))  # type: ignore[arg-type]
    assert [(p.name, p.instance, p.devices, p.dp_rank) for p in more.placements] == [
        ("decode-1-dp0", "decode-1", (3,), 0), ("decode-1-dp1", "decode-1", (4,), 1)]  # fmt: skip


def test_scale_out_on_simulated_nodes_binds_to_the_chosen_node_and_its_worker() -> None:
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0-3", "SIMULATED_NODES": "2"})
    workers = config.datasystem.addresses  # type: ignore[attr-defined]
    specs = plan_engines(config, MODEL, "m", workers)  # type: ignore[arg-type]
    assert [(s.name, s.node_id, s.devices) for s in specs] == [
        ("prefill-0", "sim-node-0", (0,)), ("decode-0", "sim-node-0", (1,))]  # both fit node 0: the tightest
    more = place_more(config, Role.DECODE, [1], specs, workers, ())  # type: ignore[arg-type]
    new = _as_specs(config, more.placements)
    assert [(s.name, s.node_id, s.devices, s.bind_host, s.ds_worker_address) for s in new] == [
        ("decode-1", "sim-node-1", (2,), "127.0.0.3", "127.0.0.3:31501")]  # fmt: skip
    assert more.shared_cores == ()


def test_a_full_cpu_shares_its_least_used_cores_instead_of_refusing() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-2"})
    more = place_more(config, Role.PREFILL, [1], specs, WORKERS, (0, 1, 2))  # type: ignore[arg-type]
    assert [(p.name, p.devices) for p in more.placements] == [("prefill-1", (2,))]  # still a free one
    running = [*specs, *_as_specs(config, more.placements)]
    shared = place_more(config, Role.DECODE, [1, 2], running, WORKERS, (0, 1, 2))  # type: ignore[arg-type]
    # Every core runs one engine: the two new ones take the lowest ids among the least used.
    assert [(p.name, p.devices) for p in shared.placements] == [("decode-1", (0,)), ("decode-2", (1,))]
    assert shared.shared_cores == (0, 1)


def test_a_cpu_instance_larger_than_all_cores_is_refused_even_shared() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-1", "CPU_CORES_PER_RANK": "1"})
    with pytest.raises(ConfigError) as refused:
        place_more(config, Role.DECODE, [1, 2, 3], specs, WORKERS, (0, 1))  # type: ignore[arg-type]
    assert str(refused.value) == (
        "cannot add 3 decode instance(s): they need 3 cpu cores (DTP=1 x DDP=1 x CPU_CORES_PER_RANK=1 each), more than "
        "the 2 in VISIBLE_DEVICES=0,1, even shared; add fewer at a time, or redeploy with more cores"
    )


def test_accelerators_without_free_devices_are_refused_in_one_line() -> None:
    config = build_config({"ACCELERATOR": "cuda", "VISIBLE_DEVICES": "0-2", "DTP": "2"})
    specs = plan_engines(config, MODEL, "m", WORKERS[:1], cores=(0, 1))
    assert [(s.name, s.devices) for s in specs] == [("prefill-0", (0,)), ("decode-0", (1, 2))]
    with pytest.raises(ConfigError) as refused:
        place_more(config, Role.DECODE, [1], specs, WORKERS[:1], (0, 1))
    assert str(refused.value) == (
        "cannot add 1 decode instance(s): they need 2 cuda devices (DTP=2 x DDP=1 each), but 0 of the 3 in "
        "VISIBLE_DEVICES=0,1,2 are free (the running engines use the rest; accelerator devices are not shared); "
        "scale another role in first, or redeploy with more devices"
    )
    more = place_more(config, Role.PREFILL, [1], specs[1:], WORKERS[:1], (0, 1))  # prefill-0 gone: device 0 free
    assert [(p.name, p.devices) for p in more.placements] == [("prefill-1", (0,))]


def test_cluster_mode_leaves_the_new_engines_to_the_scheduler() -> None:
    config = build_config({"ACCELERATOR": "cuda", "YR_SERVER_ADDRESS": "10.0.0.1:31222", "DDP": "2"})
    more = place_more(config, Role.DECODE, [1], [], (), ())
    assert [(p.name, p.node_id, p.devices) for p in more.placements] == [("decode-1-dp0", "", ()), ("decode-1-dp1", "", ())]


# --- roles, counts, names -------------------------------------------------------------


def test_roles_by_deployment_kind() -> None:
    assert resolve_role("decode", disaggregated=True) is Role.DECODE
    assert resolve_role("prefill", disaggregated=False) is Role.COLOCATED  # the same instances, PREFILL_INS_NUM
    assert resolve_role("colocated", disaggregated=False) is Role.COLOCATED
    with pytest.raises(ConfigError, match=r"^role 'colocated' is invalid: this PD-disaggregated deployment scales "
                                          r"prefill or decode$"):  # fmt: skip
        resolve_role("colocated", disaggregated=True)
    with pytest.raises(ConfigError, match=r"^role 'decode' is invalid: this PD-colocated deployment"):
        resolve_role("decode", disaggregated=False)


@pytest.mark.parametrize(("text", "delta"), [("+1", 1), ("-1", -1), ("3", 3), ("-8", -8)])
def test_counts_parse(text: str, delta: int) -> None:
    assert parse_delta(text) == delta


@pytest.mark.parametrize("text", ["0", "+9", "-9", "1.5", "one", "", "+-1"])
def test_bad_counts_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"must be \+N or -N with N from 1 to 8"):
        parse_delta(text)


def test_scale_in_takes_the_highest_index_and_keeps_one() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-5", "DECODE_INS_NUM": "3"})
    assert instances_to_remove(Role.DECODE, specs, 1) == ["decode-2"]
    assert instances_to_remove(Role.DECODE, specs, 2) == ["decode-1", "decode-2"]
    with pytest.raises(ConfigError) as refused:
        instances_to_remove(Role.PREFILL, specs, 1)
    assert str(refused.value) == ("scale prefill -1 is invalid: 1 prefill instance(s) run (prefill-0) and at least one "
                                  "must stay; remove at most 0")  # fmt: skip
    remaining = [s for s in specs if s.instance != "decode-1"]  # a gap: decode-0, decode-2
    assert next_indices(Role.DECODE, remaining, 2) == [3, 4]  # never reused while a higher one runs


def test_adoption_takes_the_engines_as_scaling_left_them() -> None:
    config, specs = _specs({"VISIBLE_DEVICES": "0-3", "PREFILL_INS_NUM": "2"})
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0"]
    previous = [  # prefill-1 was scaled in; decode-1 scaled out
        {"name": "prefill-0", "instance": "prefill-0", "role": "prefill", "devices": [0], "ds_worker_address": WORKERS[0]},
        {"name": "decode-0", "instance": "decode-0", "role": "decode", "devices": [2], "ds_worker_address": WORKERS[0]},
        {"name": "decode-1", "instance": "decode-1", "role": "decode", "devices": [3], "ds_worker_address": WORKERS[1],
         "node_id": "local", "host": "127.0.0.1"},
    ]  # fmt: skip
    adopted = adopted_specs(config, specs, previous, MODEL, "m")  # type: ignore[arg-type]
    assert [(s.name, s.role, s.devices, s.ds_worker_address, s.bind_host) for s in adopted] == [
        ("prefill-0", Role.PREFILL, (0,), WORKERS[0], "127.0.0.1"), ("decode-0", Role.DECODE, (2,), WORKERS[0], "127.0.0.1"),
        ("decode-1", Role.DECODE, (3,), WORKERS[1], "127.0.0.1")]  # fmt: skip
    assert adopted[-1].startup_params == specs[-1].startup_params and adopted[-1].kv_events == specs[-1].kv_events
    assert adopted_specs(config, specs, [], MODEL, "m") == specs  # type: ignore[arg-type]


def _as_specs(config: object, placements: Sequence[object]) -> list[EngineSpec]:
    from controller.placement import engine_specs

    return engine_specs(config, placements, MODEL, "m")  # type: ignore[arg-type]


# --- the Scaler's steps ---------------------------------------------------------------


class RecordingControl:
    """The Controller as the Scaler calls it, writing each call to ``events``."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events, self.fail = events, fail

    def add_engines(self, specs: Sequence[EngineSpec]) -> list[dict[str, object]]:
        self.events.append(f"add {','.join(s.name for s in specs)}")
        if self.fail:
            raise StartupError("an engine failed to start: engine decode-1 exited with code 1 while starting")
        return [{"name": s.name, "host": "127.0.0.1", "port": 9000 + i, "pid": 100 + i, "devices": list(s.devices)}
                for i, s in enumerate(specs)]  # fmt: skip

    def set_draining(self, name: str, draining: bool = True) -> None:
        self.events.append(f"draining {name}" if draining else f"serving again {name}")

    def remove_engine(self, name: str) -> dict[str, object]:
        self.events.append(f"remove {name}")
        if self.fail:
            raise RuntimeError("the Controller did not answer")
        return {"name": name, "pid": 7}


class ScriptedDoor:
    """The door's table as the Scaler sees it; ``refresh_now`` applies the next step."""

    def __init__(self, events: list[str], steps: list[dict[str, tuple[str, int]]]) -> None:
        self.events, self.steps, self.view = events, steps, steps[0]

    def refresh_now(self) -> None:
        self.events.append("refresh")
        if len(self.steps) > 1:
            self.steps.pop(0)
            self.view = self.steps[0]

    def engines(self) -> Mapping[str, tuple[str, int]]:
        return self.view


def _scaler(events: list[str], settings: dict[str, str], fail: bool = False) -> Scaler:
    config, specs = _specs(settings)
    clock = iter(float(t) for t in range(10_000))
    return Scaler(RecordingControl(events, fail), config, MODEL, "m", WORKERS, specs, cores=(0, 1, 2, 3),  # type: ignore[arg-type]
                  clock=lambda: next(clock), sleep=lambda s: events.append("wait"))  # fmt: skip


def test_scale_in_waits_for_the_door_to_show_no_request_in_flight_before_removing() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3", "DECODE_INS_NUM": "2", "DRAIN_TIMEOUT_S": "30"})
    door = ScriptedDoor(events, [
        {"decode-1": ("healthy", 2)},  # before the refresh: still routed to
        {"decode-1": ("draining", 2)},  # the refresh: no new requests, 2 in flight
        {"decode-1": ("draining", 0)},  # the next refresh (1 s later): both answered
        {},  # removed from the table
    ])  # fmt: skip
    result = scaler.scale("decode", -1, door)
    assert events == ["draining decode-1", "refresh", "wait", "refresh", "remove decode-1", "refresh"]
    assert result.removed == [{"name": "decode-1", "pid": 7, "in_flight_at_stop": 0}]
    assert result.warnings == [] and [s.name for s in scaler.specs] == ["prefill-0", "decode-0"]


def test_a_drain_that_runs_out_of_time_removes_anyway_and_says_how_many_were_cut() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3", "DECODE_INS_NUM": "2", "DRAIN_TIMEOUT_S": "3"})
    door = ScriptedDoor(events, [{"decode-1": ("draining", 1)}])
    result = scaler.scale("decode", -1, door)
    assert result.removed == [{"name": "decode-1", "pid": 7, "in_flight_at_stop": 1}]
    assert result.warnings == ["decode-1 did not drain within DRAIN_TIMEOUT_S=3 s: 1 request(s) still in flight are cut"]
    assert events.index("remove decode-1") > events.index("draining decode-1")


def test_an_aborted_scale_in_puts_what_it_did_not_remove_back_in_service() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3", "DECODE_INS_NUM": "2"}, fail=True)
    door = ScriptedDoor(events, [{"decode-1": ("draining", 0)}])
    with pytest.raises(RuntimeError, match="the Controller did not answer"):
        scaler.scale("decode", -1, door)
    assert events == ["draining decode-1", "refresh", "remove decode-1", "serving again decode-1"]
    assert [s.name for s in scaler.specs] == ["prefill-0", "decode-0", "decode-1"]  # still the deployment's


def test_scale_out_reports_the_engines_once_the_door_routes_to_them() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3"})
    door = ScriptedDoor(events, [{}, {"decode-1": ("healthy", 0)}])
    result = scaler.scale("decode", 1, door)
    assert events == ["add decode-1", "refresh"]
    assert result.added == [{"name": "decode-1", "url": "http://127.0.0.1:9000", "pid": 100, "devices": [2]}]
    # the fake clock advances 1 s per reading: placed, started, then the door's polls
    assert (result.phases, result.seconds) == ({"place_s": 1.0, "start_s": 1.0, "route_s": 5.0}, 7.0)
    assert [s.name for s in scaler.specs] == ["prefill-0", "decode-0", "decode-1"]


def test_a_failed_start_changes_nothing() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3"}, fail=True)
    with pytest.raises(StartupError, match="decode-1 exited with code 1"):
        scaler.scale("decode", 1, ScriptedDoor(events, [{}]))
    assert [s.name for s in scaler.specs] == ["prefill-0", "decode-0"] and scaler.progress is None


def test_one_operation_at_a_time() -> None:
    events: list[str] = []
    scaler = _scaler(events, {"VISIBLE_DEVICES": "0-3"})

    class ReentrantDoor(ScriptedDoor):
        def refresh_now(self) -> None:  # while the first operation runs, a second one asks
            with pytest.raises(ScaleBusy, match=r"^another scale operation is under way \(decode \+1: routing to decode-1\)"):
                scaler.scale("prefill", 1, ScriptedDoor(events, [{}]))
            super().refresh_now()

    scaler.scale("decode", 1, ReentrantDoor(events, [{}, {"decode-1": ("healthy", 0)}]))
    assert events == ["add decode-1", "refresh"]  # the second one changed nothing
