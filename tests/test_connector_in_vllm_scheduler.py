"""The connector's scheduler half inside vLLM's real scheduler (no model run: each step's
model output is built by hand, as the worker half would report it), with a real data
system worker behind the connector. These are the interactions a user meets as a stalled
or wrong engine: a decode whose handed-over KV fails to load must still serve every
request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from common.config import DataSystemConfig
from deploy.embedded_model import ensure_embedded_model
from testkit.helpers import PROJECT_ROOT

BLOCK = 16
NUM_BLOCKS = 17  # 16 usable: two 6-block requests fit, a third waits
PROMPT_BLOCKS = 5


def _decode_scheduler(ds_address: str) -> Scheduler:
    model = ensure_embedded_model(PROJECT_ROOT / ".cache" / "models")
    transfer = KVTransferConfig(
        kv_connector="YuanRongConnector",
        kv_connector_module_path="patch.yuanrong_connector.connector",
        kv_role="kv_consumer",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"ds_worker_address": ds_address},
    )
    config = VllmConfig(
        model_config=ModelConfig(model=str(model), max_model_len=1024, dtype="float32"),
        cache_config=CacheConfig(block_size=BLOCK),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=16, max_model_len=1024, is_encoder_decoder=False),
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
    )
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    kv_cache = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)]
    )
    return Scheduler(config, kv_cache, StructuredOutputManager(config), block_size=BLOCK, log_stats=True)


def _handoff_request(scheduler: Scheduler, index: int, saved_tail_tokens: int = 0) -> Request:
    hash_fn = get_hash_fn_by_name(scheduler.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    params.extra_args = {"kv_transfer_params": {"do_remote_prefill": True, "num_saved_blocks": PROMPT_BLOCKS,
                                                "saved_tail_tokens": saved_tail_tokens}}  # fmt: skip
    prompt = [100 + 7 * index + position for position in range(PROMPT_BLOCKS * BLOCK + 8)]
    return Request(f"req-{index}", prompt, params, None, block_hasher=get_request_block_hasher(BLOCK, hash_fn))


def _model_output(step: SchedulerOutput, connector: KVConnectorOutput | None = None) -> ModelRunnerOutput:
    ids = list(step.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={request_id: i for i, request_id in enumerate(ids)},
        sampled_token_ids=[[1] for _ in ids],
        kv_connector_output=connector,
    )


@pytest.fixture()
def decode(ds_worker: DataSystemConfig) -> Iterator[Scheduler]:
    scheduler = _decode_scheduler(ds_worker.address)
    try:
        yield scheduler
    finally:
        scheduler.shutdown()


def test_a_handoff_whose_load_failed_is_computed_and_never_stalls_the_engine(decode: Scheduler) -> None:
    requests = [_handoff_request(decode, i) for i in range(3)]
    for request in requests:
        decode.add_request(request)
    step = decode.schedule()  # two loads fit in the cache; the third request waits
    assert [r.status for r in requests] == [RequestStatus.WAITING_FOR_REMOTE_KVS] * 2 + [RequestStatus.WAITING]
    failed = set(decode.kv_cache_manager.get_block_ids("req-0")[0])
    # The first load failed from its first block (the store went down), the second came in.
    decode.update_from_output(step, _model_output(step, KVConnectorOutput(finished_recving={"req-0", "req-1"}, invalid_block_ids=failed)))

    step = decode.schedule()
    # The failed request computes its whole prompt; the loaded one computes its last 8 tokens.
    assert dict(step.num_scheduled_tokens) == {"req-0": PROMPT_BLOCKS * BLOCK + 8, "req-1": 8}
    assert [r.status for r in requests[:2]] == [RequestStatus.RUNNING] * 2
    for _ in range(4):
        decode.update_from_output(step, _model_output(step))
        step = decode.schedule()
    assert [r.status for r in requests[:2]] == [RequestStatus.FINISHED_LENGTH_CAPPED] * 2
    assert requests[2].status == RequestStatus.WAITING_FOR_REMOTE_KVS  # admitted once the others freed their blocks



def test_a_handoff_with_its_partial_last_block_leaves_the_decode_one_token_to_compute(decode: Scheduler) -> None:
    request = _handoff_request(decode, 5, saved_tail_tokens=8)
    decode.add_request(request)
    step = decode.schedule()
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert len(decode.kv_cache_manager.get_block_ids("req-5")[0]) == PROMPT_BLOCKS + 1  # the tail's block too
    decode.update_from_output(step, _model_output(step, KVConnectorOutput(finished_recving={"req-5"})))
    step = decode.schedule()
    assert dict(step.num_scheduled_tokens) == {"req-5": 1}  # the prompt's last token only
