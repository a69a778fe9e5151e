"""Verbs of run_vllm_on_yr.sh: deploy, status, logs, clean, scale.

Exit codes: 0 done; 1 a start or stop failed (reason printed); 2 bad configuration
(one line naming the setting, the value and what is allowed; nothing was started).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.config import EXAMPLE_KV_DIR, ServiceConfig
from common.errors import ConfigError, DeployError, StartupError
from common.processes import pid_alive, read_pid, write_pid
from deploy import config as config_module
from deploy.admin_client import scale
from deploy.datasystem import stop_workers, worker_listens
from deploy.goodput import door_goodput_line
from deploy.node_status import NODE_HEADER, node_rows, table_lines, yr_cli_path, yr_status_lines
from deploy.settings import add_arguments
from deploy.state import READY_MARKER, DeploymentState
from workers.engine_process import is_healthy

FRONT_DOOR_GRACE_S = 30.0
STOP_GRACE_S = 90.0  # for the engines and the worker to stop, after the door drained


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something listens on. Connections of a door just stopped (TIME_WAIT)
    do not count: Uvicorn binds with SO_REUSEADDR, and so does this probe."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"SERVER_PORT={port} is invalid: {host}:{port} is {reason}; choose a free port") from None


def check_not_running(config: ServiceConfig) -> None:
    pid = read_pid(config.pid_file)
    if pid is not None and pid_alive(pid):
        raise ConfigError(
            f"RUN_DIR={config.run_dir} is invalid: a deployment is already running there (pid {pid}); "
            "run 'bash run_vllm_on_yr.sh clean' first"
        )


def _role(engine: dict[str, object]) -> str:
    """An engine's role for ``status``: an adaptive one's with the role it acts in now."""
    acting = engine.get("acting")
    return f"adaptive ({acting})" if acting else str(engine["role"])


def _probe_host(config: ServiceConfig) -> str:
    return "127.0.0.1" if config.server_ip in ("0.0.0.0", "::") else config.server_ip


def deploy(config: ServiceConfig, flags: list[str]) -> int:
    check_not_running(config)
    check_port_free(config.server_ip, config.server_port)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    log_offset = config.deploy_log.stat().st_size if config.deploy_log.exists() else 0
    with open(config.deploy_log, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.keeper", *flags],  # it runs deploy.serve, restarting it if killed
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    write_pid(config.pid_file, process.pid)
    print(f"deploying (pid {process.pid}); progress below and in {config.deploy_log}", flush=True)
    try:
        _follow_until_ready(config, process, log_offset)
    except BaseException:
        _stop_serve_process(process.pid, config.drain_timeout_s + STOP_GRACE_S)
        raise
    print(f"ready: http://{config.server_ip}:{config.server_port}  (status: bash run_vllm_on_yr.sh status)", flush=True)
    return 0


def _follow_until_ready(config: ServiceConfig, process: subprocess.Popen[bytes], log_offset: int) -> None:
    deadline = time.monotonic() + config.engine_start_timeout_s * 2 + 300
    with open(config.deploy_log, errors="replace") as log:
        log.seek(log_offset)
        ready_seen = False
        while time.monotonic() < deadline:
            for line in log.readlines():
                print(f"  | {line.rstrip()}", flush=True)
                ready_seen = ready_seen or READY_MARKER in line
            code = process.poll()
            if code is not None:
                for line in log.readlines():
                    print(f"  | {line.rstrip()}", flush=True)
                raise StartupError(f"deploy failed (exit code {code}); the reason is above and in {config.deploy_log}")
            if ready_seen and is_healthy(_probe_host(config), config.server_port):
                return
            time.sleep(0.5)
    raise StartupError(f"the service was not ready within the deadline; see {config.deploy_log}")


def _stop_serve_process(pid: int, grace_s: float) -> bool:
    """SIGTERM the deploy process (it stops its engines and worker) and wait for it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return False


def clean(config: ServiceConfig) -> int:
    state = DeploymentState.read(config.state_file)
    pid = read_pid(config.pid_file)
    stopped_anything = False
    if pid is not None and pid_alive(pid):
        print(f"stopping deployment (pid {pid}) ...", flush=True)
        grace_s = config.drain_timeout_s + STOP_GRACE_S
        graceful = _stop_serve_process(pid, grace_s)
        print("stopped" if graceful else f"pid {pid} did not stop in {grace_s:.0f} s; killed", flush=True)
        stopped_anything = True
    serve_pid = state.pid if state is not None else None  # the keeper's child: front door and Controller
    if serve_pid is not None and serve_pid != pid and pid_alive(serve_pid):
        print(f"stopping the deploy process left running (pid {serve_pid})", flush=True)
        _stop_serve_process(serve_pid, config.drain_timeout_s + STOP_GRACE_S)
        stopped_anything = True
    if config.cluster_mode:  # the detached Controller outlives the deploy process, with its engines on every node
        stopped_anything = _stop_cluster_controller(config) or stopped_anything
    # Whatever the deploy process could not stop, stop here by the PIDs it recorded.
    for pid_path, engine_pid in _engine_pid_files(state):
        if engine_pid is not None:
            print(f"stopping engine {pid_path.stem} (pid {engine_pid})", flush=True)
            try:
                os.killpg(engine_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stopped_anything = True
        pid_path.unlink(missing_ok=True)
    ds_started_here = state.ds_started_here if state is not None else (config.pid_file.exists() and not config.cluster_mode)
    if ds_started_here:
        addresses = state.ds_worker_address.split(",") if state is not None else config.datasystem.addresses
        for address in stop_workers(addresses):
            print(f"stopped data system worker {address}", flush=True)
            stopped_anything = True
    config.state_file.unlink(missing_ok=True)
    config.pid_file.unlink(missing_ok=True)
    example_kv = config.run_dir / EXAMPLE_KV_DIR  # ExampleConnector's default folder: KV files, not logs
    if example_kv.is_dir():
        shutil.rmtree(example_kv, ignore_errors=True)
        print(f"removed ExampleConnector's KV files in {example_kv}", flush=True)
    if not stopped_anything:
        print("nothing was running", flush=True)
    return 0


def _stop_cluster_controller(config: ServiceConfig) -> bool:
    """Find the detached Controller by name in the cluster and stop it and its engines."""
    from deploy.runtime import CONTROLLER_NAME, CONTROLLER_NAMESPACE, finalize_yr, init_yr, stop_named_controller

    try:
        init_yr(config)
        stopped = stop_named_controller()
    except Exception as exc:  # the SDK's errors: the cluster is unreachable, the actor would not stop
        print(f"error: could not stop the Controller {CONTROLLER_NAME!r} in namespace {CONTROLLER_NAMESPACE!r} at "
              f"{config.yr_server_address}: {exc}", file=sys.stderr, flush=True)  # fmt: skip
        return False
    finally:
        finalize_yr()
    if stopped:
        print(f"stopped the Controller {CONTROLLER_NAME!r} (namespace {CONTROLLER_NAMESPACE!r}) and its engines", flush=True)
    return stopped


def _engine_pid_files(state: DeploymentState | None) -> list[tuple[Path, int | None]]:
    """Each engine pid file this deployment left (in the session its state.json names;
    never another deployment's), with the pid of its engine while that runs."""
    log_dir = Path(state.log_dir) if state is not None and state.log_dir else None
    pid_files = sorted(log_dir.glob("*.pid")) if log_dir is not None and log_dir.is_dir() else []
    return [(path, pid if (pid := read_pid(path)) is not None and pid_alive(pid) else None) for path in pid_files]


def status(config: ServiceConfig) -> int:
    state = DeploymentState.read(config.state_file)
    pid = read_pid(config.pid_file)
    if state is None or pid is None or not pid_alive(pid):
        orphans = [f"{path.stem} (pid {pid})" for path, pid in _engine_pid_files(state) if pid is not None]
        if orphans:
            print(f"the deploy process is gone (front door and Controller down), but engines still run: {', '.join(orphans)}; "
                  "stop them with: bash run_vllm_on_yr.sh clean")  # fmt: skip
            return 1
        print("no deployment is running (deploy with: bash run_vllm_on_yr.sh deploy)")
        return 1
    door = "healthy" if is_healthy(_probe_host(config), config.server_port) else "not answering"
    print(f"front door {state.endpoint}  pid {state.pid}  {door}  (openYuanrong {state.yr_mode} mode)")
    goodput = door_goodput_line(_probe_host(config), config.server_port, config.api_key) if door == "healthy" else None
    if goodput is not None:
        print(goodput)
    print(f"keeper pid {pid} (deploy.pid: restarts the front door's process, pid {state.pid}, if it is killed)")
    print(f"model {state.served_model_name}  data system worker(s) {state.ds_worker_address}")
    # ADDRESS: where the door reaches the engine (its node's address with simulated nodes
    # or in a cluster); "-" for a headless DP engine, which serves through its head.
    header = ("INSTANCE", "ROLE", "DEVICES", "ADDRESS", "PID", "HEALTH", "RESTARTS", "LOG")
    rows = [header]
    for engine in state.engines:
        if engine.get("headless"):  # DP_MODE=vllm: no HTTP of its own, its ranks serve through the head
            health = "headless"
        else:
            health = "healthy" if is_healthy(str(engine["host"]), int(engine["port"])) else "unhealthy"  # type: ignore[arg-type]
        devices = ",".join(str(d) for d in engine["devices"]) or "-"  # type: ignore[attr-defined]
        address = "-" if engine.get("headless") else f"{engine['host']}:{engine['port']}"
        rows.append(
            (str(engine["name"]), _role(engine), devices, address, str(engine["pid"]), health, str(engine["restarts"]), str(engine["log"]))
        )
    if len(rows) == 1:
        print("engines are still starting; progress in", config.deploy_log)
    for line in table_lines(rows):
        print(line)
    nodes = node_rows(state, worker_listens)
    if nodes:
        print()
        for line in table_lines([NODE_HEADER, *nodes]):
            print(line)
    for line in yr_status_lines(state, yr_cli_path()):
        print(line)
    return 0


def logs(config: ServiceConfig, name: str | None, lines: int) -> int:
    """The deploy log and the engine logs of this deployment's session (state.json)."""
    state = DeploymentState.read(config.state_file)
    log_dir = Path(state.log_dir) if state is not None and state.log_dir else None
    files = [config.deploy_log] + (sorted(log_dir.glob("*.log")) if log_dir is not None and log_dir.is_dir() else [])
    if name:
        files = [f for f in files if f.stem == name]
        if not files:
            raise ConfigError(f"logs {name} is invalid: no such log; choose deploy or one of the instance names in status")
    for path in files:
        print(f"==> {path} <==")
        if path.exists():
            print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="run_vllm_on_yr.sh", description="prefill/decode-disaggregated vLLM on openYuanrong")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (("deploy", "start the service and return when it is ready"), ("status", "one row per engine, then one per node"), ("clean", "stop everything deploy started")):
        add_arguments(verbs.add_parser(verb, help=text))
    log_parser = verbs.add_parser("logs", help="show the deploy log and the engines' logs")
    add_arguments(log_parser)
    log_parser.add_argument("name", nargs="?", help="deploy or an instance name")
    log_parser.add_argument("-n", "--lines", type=int, default=40)
    scale_parser = verbs.add_parser("scale", help="add (+N) or drain and remove (-N) instances of a role at runtime")
    add_arguments(scale_parser)
    scale_parser.add_argument("role", help="prefill or decode (PD); colocated (or prefill) when DECODE_INS_NUM=0")
    scale_parser.add_argument("delta", help="+N adds N instances, -N drains and removes N (N from 1 to 8)")
    scale_parser.error = _scale_usage_error  # type: ignore[method-assign]  # one line, exit 2, as for bad settings
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.verb == "scale":
            _scale_usage_error(f"unrecognized arguments: {' '.join(extra)}")
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        config = config_module.build_config(os.environ, args)
        if args.verb == "deploy":
            return deploy(config, argv[1:])
        if args.verb == "status":
            return status(config)
        if args.verb == "clean":
            return clean(config)
        if args.verb == "scale":
            return scale(config, args.role, args.delta)
        return logs(config, args.name, args.lines)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; what deploy started was stopped", file=sys.stderr)
        return 130


def _scale_usage_error(message: str) -> None:
    raise ConfigError(f"scale: {message}; usage: bash run_vllm_on_yr.sh scale <prefill|decode|colocated> <+N|-N>")


if __name__ == "__main__":
    sys.exit(main())
