"""Cluster-mode defects, each fixed and tested at the boundary that runs here (the
openYuanrong function system does not): the engine env builder, the per-node data system
worker address, the node address choice, yr start's master info, and `clean` finding the
detached Controller by name."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

import deploy.runtime as runtime
from common.config import Accelerator
from common.errors import ConfigError
from controller.placement import plan_engines
from deploy import cli
from deploy.config import build_config
from deploy.master_info import MASTER_INFO_NAME, parse_master_info
from testkit.helpers import cluster_engine_spec, isolated_env, run_cli
from workers.engine_actor import EngineActor
from workers.engine_process import build_engine_argv, build_engine_env, kv_transfer_config, resolve_on_node
from workers.node_address import host_of, routable_address, udp_source_address

MODEL = Path("/models/m")
CLUSTER = {"YR_SERVER_ADDRESS": "10.0.0.1:22770"}


# --- devices: an engine the runtime placed keeps the devices the runtime gave it ----------


@pytest.mark.parametrize(
    ("accelerator", "variable"),
    [(Accelerator.CUDA, "CUDA_VISIBLE_DEVICES"), (Accelerator.ASCEND, "ASCEND_RT_VISIBLE_DEVICES"),
     (Accelerator.CPU, "VLLM_CPU_OMP_THREADS_BIND")],
)  # fmt: skip
def test_runtime_placed_engine_keeps_the_runtimes_devices(accelerator: Accelerator, variable: str) -> None:
    spec = cluster_engine_spec(accelerator=accelerator)
    assert build_engine_env(spec, {variable: "3,5"})[variable] == "3,5"  # as the runtime set it
    assert variable not in build_engine_env(spec, {})  # unset stays unset: never an empty list


def test_cluster_mode_specs_carry_no_devices_and_leave_the_variable_alone() -> None:
    config = build_config({"ACCELERATOR": "cuda", "PTP": "2", "DTP": "2", **CLUSTER})
    prefill, decode = plan_engines(config, MODEL, "m", ())
    assert (prefill.devices, prefill.runtime_placed, prefill.bind_host) == ((), True, "")
    assert resolve_on_node(prefill, "10.0.0.7").bind_host == "10.0.0.7"  # its node's address, never 0.0.0.0
    assert build_engine_env(decode, {"CUDA_VISIBLE_DEVICES": "6,7"})["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_a_local_engine_without_devices_is_a_bug_not_an_empty_list() -> None:
    with pytest.raises(ValueError, match="engine decode-0 has no devices and was not placed by the runtime"):
        build_engine_env(cluster_engine_spec(runtime_placed=False), {"CUDA_VISIBLE_DEVICES": "0"})


# --- data system: each engine attaches to the worker on its own node -----------------------


def test_cluster_engines_attach_to_their_nodes_worker() -> None:
    config = build_config({"ACCELERATOR": "cuda", **CLUSTER})
    assert [s.ds_worker_address for s in plan_engines(config, MODEL, "m", ())] == [":31501", ":31501"]
    resolved = resolve_on_node(cluster_engine_spec(), "10.0.0.7")
    kv = kv_transfer_config(resolved)
    assert kv is not None and kv["kv_connector_extra_config"]["ds_worker_address"] == "10.0.0.7:31501"  # type: ignore[index]
    assert resolve_on_node(cluster_engine_spec(ds_worker_address="127.0.0.1:31502"), "10.0.0.7").ds_worker_address == "127.0.0.1:31502"
    ported = build_config({"ACCELERATOR": "cuda", "DS_WORKER_PORT": "4100", **CLUSTER})
    assert {s.ds_worker_address for s in plan_engines(ported, MODEL, "m", ())} == {":4100"}


def test_a_single_ds_worker_address_is_refused_in_cluster_mode() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config({"ACCELERATOR": "cuda", "DS_WORKER_ADDRESS": "10.0.0.1:31501", **CLUSTER})
    assert str(raised.value) == (
        "DS_WORKER_ADDRESS=10.0.0.1:31501 is invalid: not used in cluster mode, where every engine attaches to the "
        "data system worker on its own node; unset it, and set DS_WORKER_PORT to the port those workers listen on "
        "if it is not yr start's"
    )


def test_the_engine_actor_resolves_its_node_address_and_worker(tmp_path: Path) -> None:
    spec = cluster_engine_spec(accelerator=Accelerator.CPU, devices=(0,), tensor_parallel=1)
    actor = EngineActor(spec, str(tmp_path), start_timeout_s=30, advertise_host="", peer_host="127.0.0.1")
    info = actor.info()
    assert info["host"] == "127.0.0.1"  # the route toward a loopback master is loopback
    argv = build_engine_argv(actor._spec, 8000)
    assert '"ds_worker_address":"127.0.0.1:31501"' in argv[argv.index("--kv-transfer-config") + 1]


# --- the node address: the route toward the master, not the host name's ----------------------


def test_node_address_is_the_source_of_the_route_toward_the_peer() -> None:
    calls: list[str] = []

    def source(peer: str) -> str:
        calls.append(peer)
        return "10.1.2.3"

    assert routable_address("10.0.0.1", source_toward=source, fallback=lambda: "127.0.1.1") == "10.1.2.3"
    assert calls == ["10.0.0.1"]
    assert udp_source_address("127.0.0.1") == "127.0.0.1"  # the real probe, on loopback (sends nothing)


def test_node_address_falls_back_to_the_host_name_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    def no_route(peer: str) -> str:
        raise OSError(101, "Network is unreachable")

    with caplog.at_level(logging.WARNING, logger="workers.node_address"):
        assert routable_address("10.0.0.1", source_toward=no_route, fallback=lambda: "127.0.1.1") == "127.0.1.1"
        assert routable_address("10.0.0.1", source_toward=lambda peer: "0.0.0.0", fallback=lambda: "10.9.9.9") == "10.9.9.9"
        assert routable_address("", fallback=lambda: "10.9.9.9") == "10.9.9.9"
    assert [r.getMessage() for r in caplog.records] == [
        "node address: no route toward 10.0.0.1 ([Errno 101] Network is unreachable); using the host name's address "
        "127.0.1.1, which other nodes cannot reach",
        "node address: the route toward 10.0.0.1 gave 0.0.0.0; using the host name's address 10.9.9.9",
        "node address: no peer address to route toward; using the host name's address 10.9.9.9",
    ]


def test_host_of_addresses() -> None:
    assert [host_of(a) for a in ("10.0.0.1:22770", "http://10.0.0.1:22770", "[::1]:80", "::1", "master")] == [
        "10.0.0.1", "10.0.0.1", "::1", "::1", "master"]  # fmt: skip


# --- yr start's master info: parsed, and a stale one refused ----------------------------------

INFO = ("local_ip:10.0.0.5,master_ip:{host},etcd_ip:10.0.0.1,etcd_port:22440,etcd_peer_port:22441,"
        "global_scheduler_port:{port},ds_master_port:12123,bus-proxy:22772,bus:22773,ds-worker:31555,\n")  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens once it is closed


def test_master_info_is_parsed() -> None:
    info = parse_master_info(INFO.format(host="10.0.0.1", port=22770))
    assert (info.server_address, info.ds_address, info.ds_worker_port) == ("10.0.0.1:22770", "10.0.0.5:31555", 31555)
    with pytest.raises(ValueError, match="no global_scheduler_port"):
        parse_master_info("master_ip:10.0.0.1,")


def test_a_live_master_info_selects_cluster_mode(tmp_path: Path) -> None:
    with socket.socket() as master:
        master.bind(("127.0.0.1", 0))
        master.listen()
        port = master.getsockname()[1]
        (tmp_path / MASTER_INFO_NAME).write_text(INFO.format(host="127.0.0.1", port=port))
        config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "YR_SESSIONS_DIR": str(tmp_path)})
    assert config.cluster_mode and config.yr_server_address == f"127.0.0.1:{port}"
    assert (config.yr_ds_address, config.datasystem.node_worker_port) == ("10.0.0.5:31555", 31555)


def test_a_stale_master_info_is_refused_in_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    (tmp_path / MASTER_INFO_NAME).write_text(INFO.format(host="127.0.0.1", port=port))
    with pytest.raises(ConfigError) as raised:
        build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "YR_SESSIONS_DIR": str(tmp_path)})
    assert str(raised.value) == (
        f"{tmp_path / MASTER_INFO_NAME} names an openYuanrong master at 127.0.0.1:{port} that does not answer within "
        "1 s (stale from an earlier yr start?); if no openYuanrong cluster should be used, run 'yr stop' or remove "
        "the file; to use a cluster, set YR_SERVER_ADDRESS to its master's address"
    )
    explicit = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "YR_SESSIONS_DIR": str(tmp_path), **CLUSTER})
    assert explicit.yr_server_address == "10.0.0.1:22770"  # an explicit address: the file is not read


def test_an_unreadable_master_info_is_refused(tmp_path: Path) -> None:
    (tmp_path / MASTER_INFO_NAME).write_text("127.0.0.1:22770\n")
    with pytest.raises(ConfigError) as raised:
        build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "YR_SESSIONS_DIR": str(tmp_path)},
                     master_answers=lambda host, port: True)  # fmt: skip
    assert str(raised.value).startswith(f"{tmp_path / MASTER_INFO_NAME} is not a master info file yr start wrote (no master_ip); ")


def test_deploy_with_a_stale_master_info_exits_2_before_anything_starts(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    Path(env["YR_SESSIONS_DIR"]).mkdir(parents=True)
    Path(env["YR_SESSIONS_DIR"], MASTER_INFO_NAME).write_text(INFO.format(host="127.0.0.1", port=_closed_port()))
    result = run_cli("deploy", env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not answer" in lines[0], result.stderr
    assert not (tmp_path / "run" / "deploy.pid").exists()


# --- clean: the detached, named Controller ---------------------------------------------------


class _Ref:
    pass


class _Method:
    def __init__(self, calls: list[str], name: str) -> None:
        self._calls, self._name = calls, name

    def invoke(self) -> _Ref:
        self._calls.append(f"{self._name}.invoke")
        return _Ref()


class _Controller:
    def __init__(self, calls: list[str]) -> None:
        self._calls = calls
        self.shutdown = _Method(calls, "shutdown")

    def terminate(self, is_sync: bool = False) -> None:
        self._calls.append(f"terminate(is_sync={is_sync})")


def test_stop_named_controller_finds_it_by_name_and_stops_engines_then_the_actor() -> None:
    calls: list[str] = []

    def get_instance(name: str, namespace: str, timeout: int) -> _Controller:
        calls.append(f"get_instance({name}, {namespace}, {timeout})")
        return _Controller(calls)

    def get(ref: object, timeout: int) -> None:
        assert isinstance(ref, _Ref)
        calls.append(f"get(timeout={timeout})")

    assert runtime.stop_named_controller(get_instance, get) is True
    assert calls == ["get_instance(Controller, vllm, 10)", "shutdown.invoke", "get(timeout=120)", "terminate(is_sync=True)"]


def test_stop_named_controller_without_one_running() -> None:
    def missing(name: str, namespace: str, timeout: int) -> None:
        raise RuntimeError("failed to get instance: vllm-Controller by name")

    assert runtime.stop_named_controller(missing, lambda ref, timeout: None) is False


def test_clean_in_cluster_mode_stops_the_named_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    calls: list[str] = []
    monkeypatch.setattr(runtime, "init_yr", lambda config: calls.append(f"init {config.yr_server_address}") or "cluster")
    monkeypatch.setattr(runtime, "stop_named_controller", lambda: calls.append("stop") or True)
    monkeypatch.setattr(runtime, "finalize_yr", lambda: calls.append("finalize"))
    config = build_config({"ACCELERATOR": "cpu", "VISIBLE_DEVICES": "0,1", "RUN_DIR": str(tmp_path / "run"),
                           "YR_SESSIONS_DIR": str(tmp_path / "yr"), **CLUSTER})  # fmt: skip
    assert cli.clean(config) == 0
    assert calls == ["init 10.0.0.1:22770", "stop", "finalize"]
    assert "stopped the Controller 'Controller' (namespace 'vllm') and its engines" in capsys.readouterr().out
