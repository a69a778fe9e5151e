"""The CLI's side of the door's admin endpoints (door/admin.py): the ``scale`` verb.

``bash run_vllm_on_yr.sh scale decode +1`` posts ``{"role": "decode", "delta": 1}`` to the
running deployment's door (its address from state.json, the API key from API_KEY), prints
the operation's phases while it runs (``GET /admin/scale``), then the engines added or
removed and the seconds it took. Exit 0 done; 1 no deployment, the door unreachable, busy
with another operation, or engines that failed to start; 2 refused (a wrong role or
count, the last instance, no free devices, a wrong API key): nothing changed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from common.config import ServiceConfig
from common.errors import ConfigError, DeployError
from common.processes import pid_alive, read_pid
from common.scale_port import ROLE_WORDS, parse_delta
from deploy.state import DeploymentState

PROGRESS_POLL_S = 2.0
CALL_MARGIN_S = 300  # beyond the engines' start timeout and the drain timeout


def scale(config: ServiceConfig, role_word: str, delta_text: str) -> int:
    if role_word not in ROLE_WORDS:
        raise ConfigError(f"scale role {role_word!r} is invalid: must be one of {', '.join(ROLE_WORDS)} (prefill or "
                          "decode in a PD deployment; colocated, or prefill, when DECODE_INS_NUM=0; adaptive with "
                          "ROLES=adaptive)")  # fmt: skip
    delta = parse_delta(delta_text)
    url = door_url(config)
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    print(f"scaling {role_word} {delta:+d} through {url} (the door keeps serving meanwhile) ...", flush=True)
    started = time.monotonic()
    answer: dict[str, Any] = {}
    body = json.dumps({"role": role_word, "delta": delta}).encode()
    timeout_s = config.engine_start_timeout_s + config.drain_timeout_s + CALL_MARGIN_S

    def post() -> None:
        try:
            answer["reply"] = _call(f"{url}/admin/scale", headers, body, timeout_s)
        except DeployError as exc:
            answer["failure"] = exc

    worker = threading.Thread(target=post, name="scale-request", daemon=True)
    worker.start()
    shown = ""
    while worker.is_alive():
        worker.join(PROGRESS_POLL_S)
        if worker.is_alive():
            try:
                status, progress = _call(f"{url}/admin/scale", headers, None, 10)
            except DeployError:  # a slow moment; the answer to the request itself tells
                continue
            phase = str(progress.get("phase", "")) if status == 200 else ""
            if phase and phase != shown:
                print(f"  {time.monotonic() - started:6.1f} s  {phase}", flush=True)
                shown = phase
    if "failure" in answer:
        raise answer["failure"]
    status, reply = answer["reply"]
    elapsed = time.monotonic() - started
    if status == 200:
        for line in result_lines(reply, elapsed):
            print(line, flush=True)
        return 0
    message = _error_message(reply)
    if status == 401:
        raise ConfigError(f"API_KEY is invalid for the door at {url}: {message}; set API_KEY to the deployment's key")
    if status == 400:
        raise ConfigError(message)
    raise DeployError(f"scale {role_word} {delta:+d} failed (HTTP {status}): {message}")


def door_url(config: ServiceConfig) -> str:
    """The running deployment's door (a wildcard listening address reached on loopback);
    DeployError when no deployment runs."""
    state = DeploymentState.read(config.state_file)
    pid = read_pid(config.pid_file)
    if state is None or pid is None or not pid_alive(pid):
        raise DeployError(f"no deployment is running in RUN_DIR={config.run_dir}; deploy first: bash run_vllm_on_yr.sh deploy")
    parts = urllib.parse.urlsplit(state.endpoint)
    if parts.hostname in ("0.0.0.0", "::"):
        parts = parts._replace(netloc=f"127.0.0.1:{parts.port}")
    return urllib.parse.urlunsplit(parts).rstrip("/")


def result_lines(reply: dict[str, Any], elapsed_s: float) -> list[str]:
    lines = [f"warning: {warning}" for warning in reply.get("warnings", [])]
    phases = reply.get("phases", {})
    for engine in reply.get("added", []):
        devices = ",".join(map(str, engine.get("devices") or [])) or "-"
        lines.append(f"added {engine['name']}: {engine['url']}, pid {engine['pid']}, devices {devices}")
    for engine in reply.get("removed", []):
        lines.append(f"removed {engine['name']} (pid {engine['pid']}; {engine['in_flight_at_stop']} request(s) "
                     "in flight when it stopped)")  # fmt: skip
    if reply.get("added"):
        lines.append(f"serving {reply['seconds']:.1f} s after the request (engine start {phases.get('start_s', 0):.1f} s, "
                     f"routing {phases.get('route_s', 0):.1f} s); {elapsed_s:.1f} s from the command")  # fmt: skip
    else:
        lines.append(f"done {reply['seconds']:.1f} s after the request (drain {phases.get('drain_s', 0):.1f} s, stop "
                     f"{phases.get('stop_s', 0):.1f} s); {elapsed_s:.1f} s from the command")  # fmt: skip
    return lines


def _call(url: str, headers: dict[str, str], body: bytes | None, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer); DeployError when the door does not answer."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeployError(f"the front door at {url} does not answer ({reason}); see: bash run_vllm_on_yr.sh status") from None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": {"message": raw.decode(errors="replace").strip()[:300]}}
    return value if isinstance(value, dict) else {"error": {"message": str(value)}}


def _error_message(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    return str(error.get("message")) if isinstance(error, dict) else json.dumps(reply)
