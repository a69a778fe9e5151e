"""End to end on real vLLM engines of different TP sizes: a TP=2 prefill hands its KV to a
TP=1 decode through one real data system worker, and the decode assembles its heads from
the prefill ranks' two shards (patch/yuanrong_connector/tp_layout.py).

The deployment cannot run this pair on a 2-core machine (PTP=2 DTP=1 asks for 3 cores and
the config refuses it), so the engines are started here without the deploy CLI, with the
same building blocks the engine actors use (workers/engine_process.py), and the two legs
of the PD protocol are sent by hand, shaped by the front door's own functions
(door/frontdoor.py). vLLM CPU engines may share cores: the prefill's ranks run on
the first and second core, the decode on the second.

Steps, per prompt length (one token, half a block, one block, several blocks and a tail):
  1. the prefill leg to the TP=2 prefill; its kv_transfer_params announce tp_size 2;
  2. the decode leg to the TP=1 decode with those params; its
     ``prompt_tokens_by_source_total{source="external_kv_transfer"}`` grows by exactly the
     prompt's tokens but the last (the partial last block is handed over too);
  3. the same prompt to the decode alone, with a cache_salt of its own (vLLM 0.32's
     completions API accepts ``cache_salt``; the salt changes vLLM's block hashes, so the
     decode misses its own prefix cache, and without kv_transfer_params and with
     prefix_reuse off the connector loads nothing): a TP=1 recompute, whose greedy text
     and tokens must equal the PD answer.

Not covered here: TP=1 -> TP=2, which docs/kv-connector.md says works too. It needs a TP=1 prefill
and a TP=2 decode, two more engines than this pair; four engines do not fit on this
machine beside the data system worker, so that direction stays with the tensor and
store-level tests (tests/test_tp_layout.py, tests/test_tp_layout_store.py).

The engines start once for the module and are always stopped, also when one fails to
start; the teardown checks that no process of theirs is left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import Accelerator, ConnectorConfig, DataSystemConfig, Role
from common.errors import StartupError
from deploy.embedded_model import ensure_embedded_model
from door.legs import decode_request, prefill_request
from testkit.deployment import (
    BLOCK_SIZE,
    FLOAT32,
    PROMPT_IDS,
    PROMPT_LENGTHS,
    complete,
    external_kv_tokens,
    same_greedy_output,
    token_prompt,
)
from testkit.helpers import PROJECT_ROOT, free_port
from workers.engine_process import (
    EngineProcess,
    EngineSpec,
    build_engine_argv,
    build_engine_env,
    failure_summary,
    start_process,
    stop_process_group,
    wait_until_healthy,
)

_CORES = sorted(os.sched_getaffinity(0))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        len(_CORES) < 2,
        reason=f"a TP=2 CPU engine needs 2 cores (one per rank); this process may use {len(_CORES)}: {_CORES}",
    ),
]

MODEL_CACHE_DIR = PROJECT_ROOT / ".cache" / "models"
ENGINE_START_TIMEOUT_S = 600  # both engines together; a start takes ~30-90 s on this machine
PREFILL_TP = 2
# Generous bounds, as testkit/deployment.py deployed(): a decode waits up to 10 s for the prefill's
# blocks, a store call up to 5 s, so a slow moment of the shared cores is not a miss.
CONNECTOR = ConnectorConfig(ttl_s=1800, request_timeout_ms=5000, handoff_wait_ms=10000)


@dataclass(frozen=True)
class EnginePair:
    prefill_url: str
    decode_url: str
    served_model_name: str
    logs: dict[str, Path]


def _spec(name: str, role: Role, tensor_parallel: int, devices: tuple[int, ...], model: Path,
          ds_worker: DataSystemConfig) -> EngineSpec:  # fmt: skip
    return EngineSpec(
        name=name,
        instance=name,
        role=role,
        accelerator=Accelerator.CPU,
        tensor_parallel=tensor_parallel,
        devices=devices,  # CPU: VLLM_CPU_OMP_THREADS_BIND, one core list per rank ("0|1")
        model_path=str(model),
        served_model_name=str(model),  # as deploy/serve.py names the embedded model
        startup_params=("--enforce-eager", *FLOAT32),
        ds_worker_address=ds_worker.address,
        prefix_reuse=False,  # the decode loads only what a handoff announces
        project_root=str(PROJECT_ROOT),
        cache_root=str(MODEL_CACHE_DIR.parent / "vllm"),
        cpu_kvcache_gb=1,
        connector="yuanrong",
        connector_options=CONNECTOR.extra_config(),
    )


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """True once no process of group ``pgid`` is left (polled with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def engines(ds_worker: DataSystemConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePair]:
    """A TP=2 prefill on the first two cores and a TP=1 decode on the second, started at
    once and stopped (process groups: API server, EngineCore, workers) at the end."""
    first, second = _CORES[:2]
    model = ensure_embedded_model(MODEL_CACHE_DIR)
    log_dir = tmp_path_factory.mktemp("tp-mismatch")
    specs = [
        _spec("prefill-tp2", Role.PREFILL, PREFILL_TP, (first, second), model, ds_worker),
        _spec("decode-tp1", Role.DECODE, 1, (second,), model, ds_worker),
    ]
    ports = {spec.name: free_port() for spec in specs}
    logs = {spec.name: log_dir / f"{spec.name}.log" for spec in specs}
    processes: dict[str, EngineProcess] = {}
    try:
        for spec in specs:
            argv = build_engine_argv(spec, ports[spec.name])
            processes[spec.name] = start_process(argv, build_engine_env(spec, os.environ), logs[spec.name])
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        for spec in specs:
            try:
                wait_until_healthy(processes[spec.name], "127.0.0.1", ports[spec.name],
                                   max(deadline - time.monotonic(), 1.0), logs[spec.name], spec.name)  # fmt: skip
            except StartupError as error:
                pytest.fail(f"{spec.name} (TP={spec.tensor_parallel}, cores {spec.devices}) did not start: {error}\n"
                            f"last lines of {logs[spec.name]}:\n{failure_summary(logs[spec.name], 40)}")  # fmt: skip
        yield EnginePair(
            prefill_url=f"http://127.0.0.1:{ports['prefill-tp2']}",
            decode_url=f"http://127.0.0.1:{ports['decode-tp1']}",
            served_model_name=str(model),
            logs=logs,
        )
    finally:
        for process in processes.values():
            stop_process_group(process)
        left = [name for name, process in processes.items() if not _wait_group_gone(process.pid)]
        assert not left, f"processes of {left} still run after SIGTERM and SIGKILL of their groups"


@pytest.mark.parametrize("prompt_tokens", PROMPT_LENGTHS, ids=PROMPT_IDS)
def test_tp2_prefill_feeds_tp1_decode_with_recompute_output(engines: EnginePair, prompt_tokens: int) -> None:
    body: dict[str, object] = {"model": engines.served_model_name, "prompt": token_prompt(prompt_tokens),
                               "max_tokens": 12, "temperature": 0, "logprobs": 1}  # fmt: skip
    loaded_before = external_kv_tokens(engines.decode_url)

    # 1. the prefill leg: the TP=2 engine computes the prompt's KV and announces its TP size
    prefill_answer = complete(engines.prefill_url, prefill_request(body))
    params = prefill_answer.get("kv_transfer_params")
    assert isinstance(params, dict), f"the prefill answered without kv_transfer_params: {prefill_answer}"
    assert params.get("tp_size") == PREFILL_TP, f"the prefill's kv_transfer_params do not announce tp_size 2: {params}"

    # 2. the decode leg: the TP=1 engine loads every prompt token but the last (the partial
    #    last block too), assembling its heads from the two ranks' shards
    through_pd = complete(engines.decode_url, decode_request(body, params))
    loaded = external_kv_tokens(engines.decode_url) - loaded_before
    expected = prompt_tokens - 1  # every token but the last, the partial last block's too
    assert loaded == expected, (
        f"the TP=1 decode loaded {loaded:.0f} prompt tokens through the connector, expected {expected} "
        f"({prompt_tokens} tokens, blocks of {BLOCK_SIZE}); handoff {params}; decode log "
        f"{engines.logs['decode-tp1']}:\n{failure_summary(engines.logs['decode-tp1'], 20)}"
    )

    # 3. the same prompt computed by the decode alone: a salt of its own misses its prefix
    #    cache, and nothing comes through the connector (no handoff, prefix reuse off)
    alone_before = external_kv_tokens(engines.decode_url)
    alone = complete(engines.decode_url, {**body, "cache_salt": f"tp-mismatch-alone-{prompt_tokens}"})
    assert external_kv_tokens(engines.decode_url) == alone_before, "the reference loaded KV: it was not computed alone"
    pd_choice, alone_choice = through_pd["choices"][0], alone["choices"][0]  # type: ignore[index]
    assert same_greedy_output(through_pd, alone), (
        f"greedy output through TP=2 -> TP=1 differs from the TP=1 engine computing alone ({prompt_tokens} tokens):\n"
        f"  PD:    {pd_choice['text']!r} {pd_choice['logprobs']['tokens']} {pd_choice['logprobs']['token_logprobs']}\n"
        f"  alone: {alone_choice['text']!r} {alone_choice['logprobs']['tokens']} "
        f"{alone_choice['logprobs']['token_logprobs']}"
    )
