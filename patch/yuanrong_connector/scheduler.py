"""Scheduler-side half of YuanRongConnector (runs in the EngineCore process).

It decides, per request, which leading prompt blocks to load from the store (only
blocks the store confirms it holds, asked in one batched call) and which computed
blocks to save, and hands both lists to the worker side in each step's metadata.

A prefill's blocks are saved in the background, so a decode request can arrive before
they are published. The decode then waits (the request stays queued, the engine goes
on) until the blocks the prefill announced are all present or ``handoff_wait_ms``
passes, and loads what is there; the rest is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from patch.yuanrong_connector.keys import block_key, chained_block_hashes, loadable_block_count
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.store import BlockStore

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")


@dataclass
class _SaveProgress:
    block_hashes: list[str]
    block_ids: list[int]
    saved_blocks: int
    prompt_len: int


_RECHECK_S = 0.005  # while waiting for a handoff, ask the store at most this often
# While a request waits, vLLM's engine loop has no work and calls the scheduler again at
# once: without a pause it spins a core that the engine's API server and the data
# system worker need (seen: /health timing out, store calls timing out, under load).
_WAIT_PAUSE_S = 0.001


@dataclass
class _HandoffWait:
    deadline: float
    next_check: float


@dataclass
class _PlannedLoad:
    first_block: int
    block_hashes: list[str]


@dataclass
class YuanRongScheduler:
    settings: ConnectorSettings
    store: BlockStore
    _planned_loads: dict[str, _PlannedLoad] = field(default_factory=dict)
    _ready_loads: list[BlockTransfer] = field(default_factory=list)
    _saving: dict[str, _SaveProgress] = field(default_factory=dict)
    _loaded_blocks: dict[str, int] = field(default_factory=dict)  # leading blocks that came from the store
    _handoff_waits: dict[str, _HandoffWait] = field(default_factory=dict)
    _with_saves: set[str] = field(default_factory=set)  # vLLM holds their blocks until saved
    _warned_layout: bool = False

    @property
    def block_size(self) -> int:
        return self.settings.layout.block_size

    def _wants_load(self, request: Request) -> bool:
        params = request.kv_transfer_params or {}
        if self.settings.prefix_reuse:
            return True
        return self.settings.loads_remote_prefill and bool(params.get("do_remote_prefill"))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._wants_load(request):
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        loadable = loadable_block_count(len(prompt), self.block_size)
        first_block = num_computed_tokens // self.block_size
        if loadable <= first_block:
            return 0, False
        announced = self._announced_blocks(request, loadable)
        waiting = self._handoff_waits.get(request.request_id)
        now = time.monotonic()
        if waiting is not None and now < waiting.next_check:
            time.sleep(min(waiting.next_check - now, _WAIT_PAUSE_S))
            return None, False
        hashes = chained_block_hashes(prompt[: loadable * self.block_size], self.block_size)[first_block:]
        fingerprint = self.settings.layout.fingerprint()
        ranks = range(self.settings.layout.tp_size)
        keys = [block_key(fingerprint, rank, h) for h in hashes for rank in ranks]
        present = self.store.count_present_prefix(keys, keys_per_block=len(ranks))
        if first_block + present < announced and self.store.available:
            if waiting is None:
                waiting = _HandoffWait(deadline=now + self.settings.handoff_wait_ms / 1000, next_check=now)
                self._handoff_waits[request.request_id] = waiting
            if now < waiting.deadline:
                waiting.next_check = now + _RECHECK_S
                return None, False
            logger.warning(
                "[connector req=%s] %d of %d handed-over blocks present after %d ms; computing the rest",
                request.request_id,
                first_block + present,
                announced,
                self.settings.handoff_wait_ms,
            )
        self._handoff_waits.pop(request.request_id, None)
        if present == 0:
            return 0, False
        self._planned_loads[request.request_id] = _PlannedLoad(first_block, hashes[:present])
        return (first_block + present) * self.block_size - num_computed_tokens, False

    def _announced_blocks(self, request: Request, loadable: int) -> int:
        """Blocks a prefill engine said it saves for this request (0: no handoff, or one
        whose KV layout differs from ours, so nothing it saved can be ours)."""
        params = request.kv_transfer_params or {}
        if not (self.settings.loads_remote_prefill and params.get("do_remote_prefill")):
            return 0
        layout = params.get("layout")
        if layout is not None and layout != self.settings.layout.fingerprint():
            if not self._warned_layout:
                logger.warning(
                    "[connector] the prefill engine's KV layout %s differs from ours %s (model, dtype, block size, "
                    "heads or TP differ): prompts are computed here, nothing is handed over",
                    layout,
                    self.settings.layout.fingerprint(),
                )
                self._warned_layout = True
            return 0
        try:
            return min(int(params.get("num_saved_blocks", 0)), loadable)
        except (TypeError, ValueError):
            return 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        planned = self._planned_loads.pop(request.request_id, None)
        if planned is None or num_external_tokens == 0:
            return
        count = num_external_tokens // self.block_size
        self._loaded_blocks[request.request_id] = planned.first_block + count
        block_ids = blocks.get_block_ids()[0][planned.first_block : planned.first_block + count]
        self._ready_loads.append(
            BlockTransfer(request.request_id, tuple(planned.block_hashes[:count]), tuple(block_ids))
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> YuanRongConnectorMetadata:
        meta = YuanRongConnectorMetadata(
            loads=self._ready_loads, preempted=sorted(scheduler_output.preempted_req_ids or ())
        )
        self._ready_loads = []
        if not self.settings.saves:
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            self._saving[new.req_id] = _SaveProgress(
                block_hashes=chained_block_hashes(prompt, self.block_size),
                block_ids=list(new.block_ids[0]),
                # Blocks from vLLM's own prefix cache may be missing in the store (another
                # worker, evicted): save them again; blocks loaded from the store are there.
                saved_blocks=self._loaded_blocks.pop(new.req_id, 0),
                prompt_len=len(prompt),
            )
            self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            progress = self._saving.get(req_id)
            if progress is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if new_block_ids is not None:
                progress.block_ids.extend(new_block_ids[0])
            self._plan_save(meta, req_id, cached.num_computed_tokens[index], scheduler_output)
        return meta

    def _plan_save(
        self, meta: YuanRongConnectorMetadata, req_id: str, num_computed: int, scheduler_output: SchedulerOutput
    ) -> None:
        progress = self._saving[req_id]
        computed_after_step = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        full_blocks = min(computed_after_step, progress.prompt_len) // self.block_size
        full_blocks = min(full_blocks, len(progress.block_hashes), len(progress.block_ids))
        if full_blocks > progress.saved_blocks:
            start = progress.saved_blocks
            meta.saves.append(
                BlockTransfer(
                    req_id,
                    tuple(progress.block_hashes[start:full_blocks]),
                    tuple(progress.block_ids[start:full_blocks]),
                )
            )
            progress.saved_blocks = full_blocks
            self._with_saves.add(req_id)
        if computed_after_step >= progress.prompt_len:
            del self._saving[req_id]

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._saving.pop(request_id, None)
        self._planned_loads.pop(request_id, None)
        self._loaded_blocks.pop(request_id, None)
        self._handoff_waits.pop(request_id, None)
        # Saves run in the background: vLLM keeps the blocks until the worker reports them saved.
        hold_blocks = request_id in self._with_saves
        self._with_saves.discard(request_id)
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_decode"):
            return hold_blocks, None
        num_blocks = len(chained_block_hashes(list(request.prompt_token_ids or []), self.block_size))
        return hold_blocks, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "ds_worker_address": self.store.address,
            "num_saved_blocks": num_blocks,
            "layout": self.settings.layout.fingerprint(),
        }
