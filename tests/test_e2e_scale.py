"""End to end, scaling at runtime: one 1P1D deployment (embedded model, real engines);
while two clients send a steady stream of completions through the door (one streamed,
one not, every one asking for a fixed number of tokens), ``run_vllm_on_yr.sh scale``
adds a decode instance, removes it, adds a prefill instance, removes it. Every request
is answered 200 with all its tokens; after a scale-out state.json lists the new engine
healthy on a port of its own and it serves requests; after a scale-in its process is
gone; the command's output names the engine. Last, a bare vLLM server's start on the same
machine is timed, to print beside the scale-outs' own figures.

The tests share one deployment; each leaves it as it found it (1P1D), so each passes
alone too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from common.config import Accelerator, Role
from common.processes import pid_alive
from deploy.state import DeploymentState
from testkit.deployment import ENGINE_PARAMS, Deployment, deployed, token_prompt
from testkit.helpers import PROJECT_ROOT, free_port, run_cli, wait_for
from testkit.metrics import metric
from workers.engine_process import (
    EngineSpec,
    build_engine_argv,
    build_engine_env,
    start_process,
    stop_process_group,
    wait_until_healthy,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
_SERVING = re.compile(r"^serving ([\d.]+) s after the request \(engine start ([\d.]+) s, routing ([\d.]+) s\); "
                      r"([\d.]+) s from the command$", re.M)  # fmt: skip


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # SELECTIVE_PD_TOKENS=0: every request takes both legs, so a new prefill engine gets traffic.
    with deployed(tmp_path_factory.mktemp("scale"), PREFILL_INS_NUM="1", DECODE_INS_NUM="1", SELECTIVE_PD_TOKENS="0") as running:
        yield running


@dataclass
class Traffic:
    """Two clients sending completions until stopped: one streamed, one not; each answer
    is recorded as (kind, HTTP status, completion tokens, detail)."""

    url: str
    answers: list[tuple[str, int, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self._threads = [threading.Thread(target=self._client, args=(streamed,), daemon=True) for streamed in (False, True)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def _client(self, streamed: bool) -> None:
        sent = 0
        while not self._stop.is_set():
            sent += 1
            body = {"prompt": token_prompt(40 + (7 * sent) % 90), "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            try:
                self.answers.append(self._streamed(body) if streamed else self._whole(body))
            except httpx.HTTPError as exc:  # a broken connection is a failed request too
                self.answers.append(("streamed" if streamed else "whole", 0, 0, repr(exc)))

    def _whole(self, body: dict[str, object]) -> tuple[str, int, int, str]:
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=300)
        tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.status_code == 200 else 0
        return "whole", response.status_code, tokens, response.text[:200] if response.status_code != 200 else ""

    def _streamed(self, body: dict[str, object]) -> tuple[str, int, int, str]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        tokens, detail = 0, ""
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line.removeprefix("data: "))
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                elif response.status_code != 200:
                    detail += line
        return "streamed", response.status_code, tokens, detail[:200]

    def wait_for_answers(self, count: int, when: str) -> None:
        """Until ``count`` more requests are answered (at most 120 s)."""
        target = len(self.answers) + count
        wait_for(lambda: len(self.answers) >= target, 120, f"{count} answers {when}", interval_s=0.1)

    def check(self, during: str) -> None:
        failed = [answer for answer in self.answers if answer[1] != 200 or answer[2] != MAX_TOKENS]
        assert not failed, f"{len(failed)} of {len(self.answers)} requests failed during {during}: {failed[:5]}"
        kinds = {answer[0] for answer in self.answers}
        assert kinds == {"whole", "streamed"}, f"too few requests during {during}: {self.answers}"


def _state(deployment: Deployment) -> DeploymentState:
    state = DeploymentState.read(Path(deployment.env["RUN_DIR"]) / "state.json")
    assert state is not None
    return state


def _engine(deployment: Deployment, name: str) -> dict[str, object] | None:
    return next((engine for engine in _state(deployment).engines if engine["name"] == name), None)


def _served(deployment: Deployment, name: str) -> float:
    """Requests the engine ``name`` answered (its warm-up's included)."""
    engine = _engine(deployment, name)
    assert engine is not None, f"{name} is not in state.json"
    return metric(f"http://{engine['host']}:{engine['port']}", "vllm:request_success_total")


def _scale(deployment: Deployment, role: str, delta: str, added: str | None = None) -> str:
    """Runs ``scale role delta`` under traffic; with ``added``, the traffic goes on until
    the door has routed a request to that new engine (the rotation among idle engines
    follows the prompts, so the first few may all go to the old one)."""
    with Traffic(deployment.url) as traffic:
        traffic.wait_for_answers(4, "before the command")  # requests in flight through the old table
        started = time.monotonic()
        result = run_cli("scale", deployment.env, role, delta, timeout=900)
        elapsed = time.monotonic() - started
        traffic.wait_for_answers(4, "after the command")  # and through the new one
        if added is not None and result.returncode == 0:
            wait_for(lambda: _served(deployment, added) > 1, 60, f"a request routed to {added}", interval_s=0.5)
    print(f"\n$ bash run_vllm_on_yr.sh scale {role} {delta}  ({elapsed:.1f} s)\n{result.stdout}{result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    traffic.check(f"scale {role} {delta}")
    return result.stdout


def _scale_out(deployment: Deployment, role: str, name: str) -> None:
    output = _scale(deployment, role, "+1", added=name)
    assert f"added {name}: http://127.0.0.1:" in output
    serving = _SERVING.search(output)
    assert serving is not None, output
    after_request_s, engine_start_s = float(serving.group(1)), float(serving.group(2))
    assert after_request_s - engine_start_s < 10  # what scaling adds to an engine's own start: placement, routing
    engine = _engine(deployment, name)
    assert engine is not None and engine["state"] == "healthy" and engine["role"] == role
    ports = [other["port"] for other in _state(deployment).engines]
    assert len(set(ports)) == len(ports) == 3
    assert _served(deployment, name) > 1  # the door routed requests to it (besides the warm-up's)
    listed = httpx.get(f"{deployment.url}/admin/engines", timeout=10).json()["engines"]
    assert {row["name"]: row["state"] for row in listed}[name] == "healthy"


def _scale_in(deployment: Deployment, role: str, name: str) -> None:
    engine = _engine(deployment, name)
    assert engine is not None
    output = _scale(deployment, role, "-1")
    assert f"removed {name} (pid {engine['pid']}; 0 request(s) in flight when it stopped)" in output
    assert not pid_alive(int(engine["pid"]))  # type: ignore[call-overload]
    assert _engine(deployment, name) is None
    assert len(_state(deployment).engines) == 2
    listed = httpx.get(f"{deployment.url}/admin/engines", timeout=10).json()["engines"]
    assert name not in {row["name"] for row in listed}


def test_decode_scale_out_and_in_under_traffic(deployment: Deployment) -> None:
    _scale_out(deployment, "decode", "decode-1")
    _scale_in(deployment, "decode", "decode-1")


def test_prefill_scale_out_and_in_under_traffic(deployment: Deployment) -> None:
    _scale_out(deployment, "prefill", "prefill-1")
    _scale_in(deployment, "prefill", "prefill-1")


def test_the_last_instance_of_a_role_stays(deployment: Deployment) -> None:
    result = run_cli("scale", deployment.env, "decode", "-1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: scale decode -1 is invalid: 1 decode instance(s) run (decode-0) and at "
                                     "least one must stay; remove at most 0")  # fmt: skip


def test_scale_out_time_against_a_bare_vllm_start(deployment: Deployment, tmp_path: Path) -> None:
    """A vLLM server of the same model and flags, without a connector or a deployment
    around it, started on this machine while the deployment idles beside it."""
    spec = EngineSpec(
        name="bare", instance="bare", role=Role.DECODE, accelerator=Accelerator.CPU, tensor_parallel=1, devices=(0,),
        model_path=deployment.state.served_model_name, served_model_name=deployment.state.served_model_name,
        startup_params=tuple(ENGINE_PARAMS.split()), ds_worker_address="", prefix_reuse=False, project_root=str(PROJECT_ROOT),
        cache_root=str(PROJECT_ROOT / ".cache" / "vllm"), cpu_kvcache_gb=1, connector="none",
    )  # fmt: skip
    port = free_port()
    log = tmp_path / "bare.log"
    started = time.monotonic()
    process = start_process(build_engine_argv(spec, port), build_engine_env(spec, dict(deployment.env)), log)
    try:
        wait_until_healthy(process, "127.0.0.1", port, 600, log, "bare")
        print(f"\nbare vLLM server start: {time.monotonic() - started:.1f} s (the scale-outs' engine starts are printed above)")
    finally:
        stop_process_group(process)
