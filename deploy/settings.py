"""The one list of a deployment's settings: each setting's environment name (seed 000's
names where the seed has one), its default and what it does. The flag of a setting is its
environment name in lower case with dashes (``PTP`` -> ``--ptp``). deploy/config.py
builds the ``ServiceConfig`` from them; docs/configuration.md is written from them
(deploy/config_page.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.config import NO_CONNECTOR, VLLM_CONNECTORS, YUANRONG_CONNECTOR
from deploy.master_info import MASTER_INFO_NAME

# vLLM flags the system owns: each engine's address, its parallelism and the KV
# connector are decided by the Controller, never by user pass-through params.
OWNED_ENGINE_FLAGS = (
    "--host",
    "--port",
    "--tensor-parallel-size",
    "-tp",
    "--data-parallel-size",
    "-dp",
    "--data-parallel-rank",
    "--data-parallel-start-rank",
    "--data-parallel-size-local",
    "--data-parallel-address",
    "--data-parallel-rpc-port",
    "--kv-transfer-config",
    "--served-model-name",
    "--headless",
)


@dataclass(frozen=True)
class _Setting:
    env: str
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def dest(self) -> str:
        return self.env.lower()


SETTINGS: tuple[_Setting, ...] = (
    _Setting("SERVER_IP", "127.0.0.1", "address the front door listens on"),
    _Setting("SERVER_PORT", "9000", "port the front door listens on"),
    _Setting("MODEL_PATH", None, "model folder; unset: the embedded random-weight model"),
    _Setting("PREFILL_INS_NUM", "1", "number of prefill instances (colocated when DECODE_INS_NUM=0)"),
    _Setting("DECODE_INS_NUM", "1", "number of decode instances; 0 = PD-colocated (kv_both)"),
    _Setting("PTP", "1", "tensor-parallel size of each prefill instance"),
    _Setting("DTP", "1", "tensor-parallel size of each decode instance"),
    _Setting("PDP", "1", "data-parallel engines per prefill instance"),
    _Setting("DDP", "1", "data-parallel engines per decode instance"),
    _Setting("DP_MODE", "independent", "how an instance's DP ranks run: `independent` (each rank its own vLLM server; the door balances "
             "over them); `vllm` (vLLM's own data parallelism: one engine per node of an instance, the rank-0 "
             'node\'s serving HTTP, the others `--headless`; see "vLLM\'s own data parallelism"). With PDP or '
             'DDP > 1 the routing policy defaults to prefix_affinity, and an explicit '
             '`ROUTING_POLICY=kv_aware` is refused'),
    _Setting("USING_PREFIX_CONNECTOR", "0", "1: every instance reuses prefixes found in the data system"),
    _Setting("KV_CONNECTOR", YUANRONG_CONNECTOR, f"{YUANRONG_CONNECTOR} (ours, through the data system), {NO_CONNECTOR} "
             f"(vanilla vLLM; colocated only) or one of vLLM's: {', '.join(VLLM_CONNECTORS)}"),
    _Setting("KV_CONNECTOR_EXTRA_CONFIG", "{}", "JSON object given to one of vLLM's connectors as `kv_connector_extra_config` "
             '(`ExampleConnector`: `shared_storage_path` defaults to `<RUN_DIR>/example_kv`)'),
    _Setting("ACCELERATOR", None, "cpu, cuda or ascend; unset: detected"),
    _Setting("VISIBLE_DEVICES", None, 'device ids (CPU cores on cpu) engines may use, e.g. 0,1 or 0-3; on cuda/ascend defaults to '
             '`CUDA_VISIBLE_DEVICES` / `ASCEND_RT_VISIBLE_DEVICES`'),
    _Setting("ENGINE_KIND", "vllm", 'vllm (real engines) or simulated: each engine is a simulated vLLM (its OpenAI API, KV events and '
             "metrics from a simulated paged KV cache and scheduler, time spent as `SIM_PROFILE` says; no model "
             "computed, no core taken; see docs/simulated-engines.md). With simulated engines `VISIBLE_DEVICES` "
             "names virtual devices, one per engine by default; local mode only"),
    _Setting("SIM_PROFILE", "cpu-93m-float32", "simulated engines' cost profile: a shipped one (workers/sim_engine/profiles) or a "
             "JSON file (`bench calibrate` writes one)"),
    _Setting("PREFILL_STARTUP_PARAMS", "", "extra vLLM arguments for prefill engines"),
    _Setting("DECODE_STARTUP_PARAMS", "", "extra vLLM arguments for decode engines"),
    _Setting("VLLM_CPU_KVCACHE_SPACE", "1", "KV cache GiB per CPU engine"),
    _Setting("CPU_CORES_PER_RANK", "1", "cpu: cores each TP rank of an engine gets (its threads' `VLLM_CPU_OMP_THREADS_BIND`); an engine "
             'takes TP x this many'),
    _Setting("ENGINE_START_TIMEOUT", "600", "seconds an engine may take to become healthy"),
    _Setting("DS_WORKER_ADDRESS", None, 'local mode: data system worker host:port; unset: 127.0.0.1:31501. Refused in cluster mode (see '
             '`DS_WORKER_PORT`)'),
    _Setting("DS_WORKER_PORT", None, 'cluster mode: port of the data system worker openYuanrong runs on every node; each engine '
             "attaches to `<its node's address>:<port>`; unset: the `ds-worker` port in yr start's master "
             'info, else 31501'),
    _Setting("DS_METASTORE_PORT", "32379", "metastore port of a locally started data system worker"),
    _Setting("DS_SHARED_MEMORY_MB", "2048", 'shared memory (DRAM tier) of each locally started worker'),
    _Setting("DS_SHARED_MEMORY_POPULATE", "1", '1: a locally started worker touches all its shared memory at start (memory committed at once; '
             "no page faults while engines save: measured, reuse then costs nothing on seed 000's workload); "
             '0: on first use'),
    _Setting("DS_SPILL_DIR", None, "SSD spill folder of a locally started worker; unset: no spill"),
    _Setting("DS_SPILL_SIZE_MB", "8192", "SSD spill limit of a locally started worker"),
    _Setting("DS_WORKERS", "1", 'data system workers to start locally (consecutive ports from DS_WORKER_ADDRESS, one cluster; '
             'engines attach in turn)'),
    _Setting("SIMULATED_NODES", "0", 'local mode: split this machine into N simulated nodes (127.0.0.2, 127.0.0.3, ...), each with '
             "its own data system worker at DS_WORKER_ADDRESS's port and a contiguous share of "
             '`VISIBLE_DEVICES` (see "Simulated nodes"); 0: off. Refused in cluster mode, with `DS_WORKERS` > '
             '1, or above the number of visible devices'),
    _Setting("KV_TTL_S", "1800", "seconds a KV block stays in the data system; 0 = until the worker stops"),
    _Setting("KV_REQUEST_TIMEOUT_MS", "2000", 'bound on each data system call; a slower store is a miss and vLLM recomputes'),
    _Setting("DS_EXCLUSIVE_CONNECTIONS", "1", "1: each engine's data system client has its own connection to the worker (the SDK's "
             '`enable_exclusive_connection`; a worker takes 128, an engine uses 3); 0: the shared connection, '
             'whose worker threads busy-loop once the engines saturate the CPU (see "Seed 000\'s workload")'),
    _Setting("KV_HANDOFF_WAIT_MS", "2000", "how long a decode waits for a prefill's KV blocks to be published"),
    _Setting("KV_CHECKSUM", "1", "1: a loaded KV block's checksum is checked before the model sees it (a mismatch is "
             "computed instead, vllm:yuanrong_kv_blocks_total{op=\"load_corrupt\"}); 0: only its key and length"),
    _Setting("ROUTING_POLICY", "kv_aware", 'prefill/colocated routing: round_robin, least_outstanding, prefix_affinity, kv_aware (engines '
             'publish KV events; the door routes every leg, decode too, by the prompt tokens each engine '
             'holds, and skips the prefill leg where `SELECTIVE_PD_TOKENS` says). Unset with `DP_MODE=vllm` '
             'and PDP or DDP > 1: prefix_affinity (vLLM picks the rank; the door cannot see its KV)'),
    _Setting("SELECTIVE_PD_TOKENS", "256", "kv_aware, PD: a request whose prompt the chosen decode engine lacks at most this many "
             "tokens of skips the prefill leg (ROLES=adaptive: only a decode engine with nothing in flight); "
             "0: every request takes both legs"),
    _Setting("MAX_IN_FLIGHT_PER_ENGINE", "128", "requests the door lets each serving (decode or colocated) engine have at once; "
             "with ROLES=adaptive, each engine"),
    _Setting("SLO_TTFT_MS", "2000", "service level for time to first token; the door counts the requests that meet it and "
             "`SLO_ITL_MS` (goodput, `frontdoor_slo_requests_total`, `status`)"),
    _Setting("ROLES", "fixed", "fixed: engines are prefill, decode (or colocated) for life; adaptive: PREFILL_INS_NUM + "
             "DECODE_INS_NUM engines that each serve whole requests, prefill legs or decode legs, starting as that split; "
             "a planner changes their roles to meet SLO_TTFT_MS and SLO_ITL_MS, with no restart (a prefill leg's prompt is saved for its decode leg; USING_PREFIX_CONNECTOR=1 reuses every prompt's; "
             "PTP=DTP, PDP=DDP=1)"),
    _Setting("PLANNER_WINDOW_S", "20", "ROLES=adaptive: seconds of answers the role planner judges at a time (5-600)"),
    _Setting("PLANNER_SETTLE_S", "30", "ROLES=adaptive: seconds a new role layout serves before the planner judges it "
             "(at least PLANNER_WINDOW_S)"),
    _Setting("PLANNER_MAX_ENGINES", "0", "ROLES=adaptive: when no role change meets the service levels the planner adds "
             "engines (scale adaptive +1) up to this many; 0: it never scales, it says more engines are needed"),
    _Setting("PLANNER_MIN_ENGINES", "2", "ROLES=adaptive with PLANNER_MAX_ENGINES: the planner removes engines (both "
             "levels met with room) down to this many"),
    _Setting("SLO_ITL_MS", "100", "service level for the mean inter-token latency of a stream (TPOT)"),
    _Setting("DOOR_QUEUE_SIZE", "256", "requests that may wait at the door for a slot; beyond: 429 at once"),
    _Setting("DOOR_QUEUE_TIMEOUT_S", "30", "seconds a request may wait at the door for a slot; then 429"),
    _Setting("STREAM_MIGRATIONS", "1", 'times a stream (completions or chat) whose engine dies mid-way is continued on another engine '
             "(the prompt's and the generated tokens' ids as the new prompt; the client reads one stream); 0: "
             'never'),
    _Setting("PREFILL_TIMEOUT_S", "120", 'PD: a prefill leg not answered within this many seconds is aborted (the door drops its '
             'connection), its engine suspected, and the decode engine computes the prompt itself'),
    _Setting("WARM_UP_TOKENS", "2048", 'new engines (deploy, scale-out) compute one synthetic prompt this long (at most their '
             'max_model_len) before the door routes to them, PD engines as a handoff through the data system; 0: no warm-up. '
             'Long enough that the first long prompts run as fast as later ones'),
    _Setting("DOOR_READ_TIMEOUT_S", "60", "seconds a client may take to send one whole request, from its first byte; "
             "then 408 and the connection is closed (a client that sends part of a request and stops holds nothing)"),
    _Setting("DRAIN_TIMEOUT_S", "30", "on clean, SIGTERM or Ctrl-C: seconds requests in flight may take to finish"),
    _Setting("API_KEY", None, 'when set, every HTTP port of the deployment (the door and each engine) needs `Authorization: '
             "Bearer <API_KEY>` (401 in OpenAI's form otherwise), `/health` excepted; the door sends it to "
             'the engines; never logged, never on a command line'),
    _Setting("METRICS_PUBLIC", "0", 'with `API_KEY`: 1 serves `/metrics` (door and engines) without the key, for scrapers without a '
             'bearer token'),
    _Setting("RUN_DIR", None, "where deploy.log, deploy.pid and state.json live; unset: project root"),
    _Setting("YR_SESSIONS_DIR", "/tmp/yr_sessions", 'openYuanrong session folder: each deployment logs to a session of its own, '
             '`vllm-<time>-<pid>/log` (`latest` points at the newest; a deploy process restarted by the '
             'keeper keeps its session)'),
    _Setting("MODEL_CACHE_DIR", None, "where the embedded model is built; unset: <project>/.cache/models"),
    _Setting("YR_SERVER_ADDRESS", None, "openYuanrong cluster address; unset: read yr start's master info "
             f"(<YR_SESSIONS_DIR>/{MASTER_INFO_NAME}, refused when its master does not answer)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; a flag given wins over the environment."""
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.dest, default=None, metavar=setting.env, help=setting.help)
