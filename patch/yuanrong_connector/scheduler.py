"""Scheduler-side half of YuanRongConnector (runs in the EngineCore process).

Per request it decides which leading prompt blocks to load from the store and which
computed blocks to save, and hands both to the worker side in each step's metadata.
It never waits for the store on the engine loop:

- **Handoff (decode).** The prefill announced how many leading blocks it saves, and
  whether it saved the prompt's partial last block too (its valid tokens: ``tail``).
  The decode claims every handed-over token but the prompt's last (vLLM computes that
  one, whose logits give the first output token, as its own P/D connectors do) at once
  as an *asynchronous* load (``(n, True)``): vLLM allocates
  the blocks and parks the request; the worker's loader waits, off the engine loop, up
  to ``handoff_wait_ms`` for the blocks to be published, copies them in, and reports the
  request through ``get_finished`` (blocks that never came through
  ``get_block_ids_with_load_errors``: vLLM computes them). A request whose load failed,
  and every request while the store is marked down, is computed: never claimed as a
  second asynchronous load (that stalls vLLM 0.32's scheduler, see
  ``get_num_new_matched_tokens``).
- **Prefix reuse.** Which leading blocks the store holds is asked in one batched
  ``exist`` call run by a lookup thread; one scheduling pass waits for lookups at most
  ``_LOOKUP_BUDGET_S`` in all, whatever the number of new requests (a request whose
  answer has not come stays queued and is asked about again next pass, bounded by the
  store's request timeout), then loads the blocks asynchronously too.
- **Another TP size.** A prefill of another TP size (same model, dtype, block size,
  device family) announces its TP size; its blocks are loaded and each rank assembles
  its heads from the prefill's shards (tp_layout.py). Prefix reuse asks about the TP
  sizes in ``peer_tp_sizes`` only when its own has fewer blocks.
- **Saves.** Full prompt blocks are saved after the step that computed them, in the
  background; a prefill leg's partial last block too, once the whole prompt is computed
  (keyed by its tokens: keys.tail_block_hash, so it is never a reusable prefix of
  another prompt; prefix reuse looks up full blocks only). Saves are planned only while the store takes them and the backlog has
  room (the worker reports both each step), and a request's saves stop at its first
  skipped block, so what a prefill *announces* is exactly what it stored or has in
  flight: a decode never waits for a block that will not come.
- **Preemption.** A resumed request gets a new block list from vLLM; its later saves
  read the new blocks, never the ones it held before.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from patch.yuanrong_connector.keys import KVLayout, block_keys, chain_root, chained_block_hashes, tail_block_hash
from patch.yuanrong_connector.metadata import BlockTransfer, YuanRongConnectorMetadata, YuanRongWorkerMetadata
from patch.yuanrong_connector.remote_store import Store
from patch.yuanrong_connector.settings import ConnectorSettings
from patch.yuanrong_connector.tp_layout import source_ranks

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(f"vllm.{__name__}")

# How long one scheduling pass waits for prefix lookups, all its requests together, before
# moving on (the lookups go on; their requests are asked about again in the next pass). A
# budget per request would let a burst of 100 new prompts add 0.5 s to a step.
_LOOKUP_BUDGET_S = 0.005


@dataclass
class _SaveProgress:
    block_hashes: list[str]
    block_ids: list[int]
    saved_blocks: int  # leading blocks stored, loaded, or planned for save
    prompt_len: int
    tail_hash: str | None = None  # a prefill leg's partial last block: saved once the prompt is computed
    stopped: bool = False  # a save was skipped: blocks after the gap would be unreachable, so none are saved


@dataclass
class _PlannedLoad:
    first_block: int
    block_hashes: list[str]
    wait_s: float
    source_tp: int | None = None  # the TP size that stored them, where not ours


def request_chain_root(request: Request) -> bytes:
    """The start of a request's key chain: covers its LoRA adapter, cache salt and
    multimodal inputs (see keys.chain_root)."""
    lora = getattr(request, "lora_request", None)
    features = getattr(request, "mm_features", None) or ()
    return chain_root(
        lora_name=getattr(lora, "lora_name", None) if lora is not None else None,
        cache_salt=getattr(request, "cache_salt", None),
        mm_identifiers=[str(feature.identifier) for feature in features],
    )


@dataclass
class YuanRongScheduler:
    settings: ConnectorSettings
    store: Store
    enabled: bool = True  # False: a KV layout this connector does not handle; it does nothing
    _hashes: dict[str, list[str]] = field(default_factory=dict)  # request -> its full blocks' chain hashes
    _tails: dict[str, str] = field(default_factory=dict)  # prefill leg -> its partial last block's hash
    _lookups: dict[str, tuple[int, Future[tuple[int, int | None]]]] = field(default_factory=dict)  # asked from, answer
    _planned_loads: dict[str, _PlannedLoad] = field(default_factory=dict)
    _ready_loads: list[BlockTransfer] = field(default_factory=list)
    _saving: dict[str, _SaveProgress] = field(default_factory=dict)
    _announced: dict[str, int] = field(default_factory=dict)  # leading blocks a prefill may announce
    _announced_tail: dict[str, int] = field(default_factory=dict)  # prefill leg -> tokens of its saved partial last block
    _loaded_blocks: dict[str, int] = field(default_factory=dict)  # leading blocks that came from the store
    _loading: dict[str, frozenset[int]] = field(default_factory=dict)  # request -> blocks its async load fills
    _load_failed: set[str] = field(default_factory=set)  # a load of theirs failed: they compute from now on
    _with_saves: set[str] = field(default_factory=set)  # vLLM holds their blocks until saved
    _prefill_legs: set[str] = field(default_factory=set)  # saves_every_prompt off: the requests to save
    _arrived: dict[str, float] = field(default_factory=dict)  # for the debug timeline
    _planned_save_blocks: int = 0
    _done_save_blocks: int = 0
    _saves_paused: bool = False
    _warned_layout: bool = False
    _told_reshard: bool = False
    _lookup_pool: ThreadPoolExecutor | None = None
    _pass_lookup_deadline: float | None = None  # this pass's lookup budget ends then (set by its first wait)

    @property
    def block_size(self) -> int:
        return self.settings.layout.block_size

    # ---- loads ----
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        request_id = request.request_id
        self._arrived.setdefault(request_id, time.monotonic())
        hashes = self._block_hashes(request)
        prompt = request.prompt_token_ids or ()
        if not self.settings.saves_every_prompt and (request.kv_transfer_params or {}).get("do_remote_decode"):
            self._prefill_legs.add(request_id)
        # A prefill leg's partial last block is handed over when it holds more than the
        # prompt's last token (which the decode computes anyway).
        if (request_id not in self._tails and self.settings.saves and len(prompt) % self.block_size >= 2
                and (request.kv_transfer_params or {}).get("do_remote_decode")):  # fmt: skip
            self._tails[request_id] = tail_block_hash(prompt, self.block_size, hashes, request_chain_root(request))  # type: ignore[assignment]
        if not (self.settings.prefix_reuse or self._is_handoff(request)):
            return 0, False
        if request_id in self._load_failed or not self.store.available:
            # Compute, never claim a second asynchronous load: vLLM frees a request whose
            # load failed from its first block but keeps it at the head of the queue of
            # block-holding requests, and a second async admission counts the request's
            # own full prompt as reserved against itself; it never fits, the requests
            # behind it are never promoted, and with nothing running the engine stalls.
            return 0, False
        first_block = num_computed_tokens // self.block_size
        handed, source_tp = self._handed_over(request, hashes)
        if handed:
            # Every handed-over token but the prompt's last: vLLM computes that one.
            handed_tokens = len(prompt) if len(handed) > len(hashes) else len(handed) * self.block_size
            end = min(handed_tokens, len(prompt) - 1)
            if end > num_computed_tokens:
                wait_s = self.settings.handoff_wait_ms / 1000
                last_block = -(-end // self.block_size)
                self._planned_loads[request_id] = _PlannedLoad(first_block, handed[first_block:last_block], wait_s, source_tp)
                return end - num_computed_tokens, True
        # Prefix reuse: every full prompt block may be loaded (when an asynchronous load
        # covers the whole prompt, vLLM recomputes just its last token, not the whole last block).
        loadable = len(hashes)
        if not self.settings.prefix_reuse or loadable <= first_block:
            return 0, False
        found = self._present_blocks(request_id, hashes, first_block, loadable)
        if found is None:
            return None, False  # the store has not answered yet: ask again next pass
        present, source_tp = found
        if present == 0:
            return 0, False
        planned = _PlannedLoad(first_block, hashes[first_block : first_block + present], 0.0, source_tp)
        self._planned_loads[request_id] = planned
        return (first_block + present) * self.block_size - num_computed_tokens, True

    def _block_hashes(self, request: Request) -> list[str]:
        hashes = self._hashes.get(request.request_id)
        if hashes is None:
            prompt = list(request.prompt_token_ids or ())
            hashes = chained_block_hashes(prompt, self.block_size, request_chain_root(request))
            self._hashes[request.request_id] = hashes
        return hashes

    def _is_handoff(self, request: Request) -> bool:
        params = request.kv_transfer_params or {}
        return self.settings.loads_remote_prefill and bool(params.get("do_remote_prefill"))

    def _present_blocks(
        self, request_id: str, hashes: list[str], first_block: int, loadable: int
    ) -> tuple[int, int | None] | None:
        """Blocks from ``first_block`` on that the store holds (every TP rank's part) and
        the TP size that stored them (None: ours), or None while the lookup is still running.

        A lookup may finish passes after it was asked, when vLLM's own prefix cache has
        grown (another request computed the same prefix): its count runs from the block
        it was asked from, not from this pass's ``first_block``. Counted from the wrong
        block, the claim would pass the end of the prompt (vLLM asserts
        ``num_computed_tokens <= request.num_tokens`` and the engine dies)."""
        entry = self._lookups.get(request_id)
        if entry is None:
            if self._lookup_pool is None:
                self._lookup_pool = ThreadPoolExecutor(1, thread_name_prefix="yuanrong-kv-lookup")
            entry = (first_block, self._lookup_pool.submit(self._count_stored, hashes[first_block:loadable]))
            self._lookups[request_id] = entry
        asked_from, lookup = entry
        if self._pass_lookup_deadline is None:
            self._pass_lookup_deadline = time.monotonic() + _LOOKUP_BUDGET_S
        try:
            present, source_tp = lookup.result(timeout=max(0.0, self._pass_lookup_deadline - time.monotonic()))
        except FutureTimeout:
            return None
        del self._lookups[request_id]
        if asked_from > first_block:
            return 0, None  # the blocks between are unknown: compute them
        return max(0, min(asked_from + present, loadable) - first_block), source_tp

    def _count_stored(self, hashes: list[str]) -> tuple[int, int | None]:
        """(leading blocks of ``hashes`` stored for every rank of ours, None), or where a TP
        size of ``peer_tp_sizes`` stored more, (its count, that size): its ranks that hold
        our heads are asked about only when ours has fewer than all. On the lookup thread."""
        own = self.settings.layout
        ranks: tuple[int, ...] = tuple(range(own.tp_size))
        best: tuple[int, int | None] = (self.store.count_present_prefix(block_keys(own, ranks, hashes), len(ranks)), None)
        for tp in self.settings.peer_tp_sizes:
            if best[0] == len(hashes):
                break
            writers = source_ranks(own.num_kv_heads, tp, own.tp_size, ranks)
            count = self.store.count_present_prefix(block_keys(own.with_tp(tp), writers, hashes), len(writers))
            if count > best[0]:
                best = (count, tp)
        return best

    def _handed_over(self, request: Request, hashes: list[str]) -> tuple[list[str], int | None]:
        """The hashes of the blocks a prefill engine said it stored for this request, in
        order (its partial last block's last, where it stored that too), and its TP size
        where it is not ours (([], None): no handoff, or one whose KV layout differs from
        ours in more than the TP size, so nothing it saved can be ours)."""
        if not self._is_handoff(request):
            return [], None
        params = request.kv_transfer_params or {}
        layout = params.get("layout")
        own = self.settings.layout
        source_tp = None
        if layout is not None and layout != own.fingerprint():
            source_tp = _other_tp(own, layout, params.get("tp_size"))
            if source_tp is None:
                if not self._warned_layout:
                    logger.warning(
                        "[connector] the prefill engine's KV layout %s differs from ours %s (model, dtype, block size, "
                        "heads or device family differ): prompts are computed here, nothing is handed over",
                        layout,
                        own.fingerprint(),
                    )
                    self._warned_layout = True
                return [], None
            if not self._told_reshard:
                logger.info(
                    "[connector] the prefill engine runs TP size %d, we run %d: its blocks are resharded on load",
                    source_tp,
                    own.tp_size,
                )
                self._told_reshard = True
        try:
            announced = max(0, min(int(params.get("num_saved_blocks", 0)), len(hashes)))
        except (TypeError, ValueError):
            return [], None
        handed = hashes[:announced]
        prompt = request.prompt_token_ids or ()
        tail_tokens = len(prompt) % self.block_size
        if announced == len(hashes) and tail_tokens and params.get("saved_tail_tokens") == tail_tokens:
            handed.append(tail_block_hash(prompt, self.block_size, hashes, request_chain_root(request)))  # type: ignore[arg-type]
        return handed, source_tp

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        planned = self._planned_loads.pop(request.request_id, None)
        if planned is None or num_external_tokens == 0:
            return
        count = -(-num_external_tokens // self.block_size)  # the last one may be partly claimed
        if planned.source_tp is None:  # blocks resharded from another TP size are saved again in ours
            self._loaded_blocks[request.request_id] = planned.first_block + count
        block_ids = blocks.get_block_ids()[0][planned.first_block : planned.first_block + count]
        self._loading[request.request_id] = frozenset(block_ids)
        self._ready_loads.append(
            BlockTransfer(
                request.request_id, tuple(planned.block_hashes[:count]), tuple(block_ids), planned.wait_s, planned.source_tp
            )
        )

    # ---- saves ----
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        failed_block_ids = connector_output.invalid_block_ids
        for request_id in connector_output.finished_recving or ():
            blocks = self._loading.pop(request_id, frozenset())
            if blocks & failed_block_ids or request_id in connector_output.failed_recving:
                self._load_failed.add(request_id)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, YuanRongWorkerMetadata):
            self._done_save_blocks = max(self._done_save_blocks, meta.save_blocks_done)
            self._saves_paused = meta.saves_paused

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> YuanRongConnectorMetadata:
        self._pass_lookup_deadline = None  # the pass is over: the next one has its own budget
        meta = YuanRongConnectorMetadata(
            loads=self._ready_loads,
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
            idle_step=scheduler_output.total_num_scheduled_tokens == 0,
        )
        self._ready_loads = []
        if not self.settings.saves or not self.enabled:
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            hashes = self._hashes.get(new.req_id)
            if hashes is None or not (self.settings.saves_every_prompt or new.req_id in self._prefill_legs):
                continue
            # Blocks from vLLM's own prefix cache may be missing in the store (another
            # worker, evicted): save them again; blocks loaded from the store are there.
            loaded = min(self._loaded_blocks.pop(new.req_id, 0), new.num_computed_tokens // self.block_size)
            self._saving[new.req_id] = _SaveProgress(hashes, list(new.block_ids[0]), loaded, len(new.prompt_token_ids or ()),
                                                     self._tails.get(new.req_id))  # fmt: skip
            self._announced[new.req_id] = loaded
            self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = cached.resumed_req_ids
        for index, req_id in enumerate(cached.req_ids):
            progress = self._saving.get(req_id)
            if progress is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if req_id in resumed:
                # vLLM gives a resumed request its whole (new) block list: what it held
                # before preemption belongs to other requests now.
                self._loaded_blocks.pop(req_id, None)
                progress.block_ids = list(new_block_ids[0]) if new_block_ids is not None else []
            elif new_block_ids is not None:
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
        start = progress.saved_blocks
        hashes, block_ids = progress.block_hashes[start:full_blocks], progress.block_ids[start:full_blocks]
        tail = (
            progress.tail_hash is not None
            and computed_after_step >= progress.prompt_len
            and full_blocks == len(progress.block_hashes)
            and len(progress.block_ids) > full_blocks
        )
        if tail:
            hashes, block_ids = [*hashes, progress.tail_hash], [*block_ids, progress.block_ids[full_blocks]]  # type: ignore[list-item]
        count = len(hashes)
        if count > 0 and not progress.stopped:
            backlog = self._planned_save_blocks - self._done_save_blocks
            if self._saves_paused or not self.store.available or backlog + count > self.settings.max_pending_save_blocks:
                progress.stopped = True
                logger.warning(
                    "[connector req=%s] not saving blocks %d and later (%s): they are computed, not handed over",
                    req_id,
                    progress.saved_blocks,
                    "store full or down" if self._saves_paused or not self.store.available else f"{backlog} blocks pending",
                )
            else:
                meta.saves.append(BlockTransfer(req_id, tuple(hashes), tuple(block_ids)))  # type: ignore[arg-type]
                progress.saved_blocks = full_blocks
                self._announced[req_id] = full_blocks
                if tail:
                    self._announced_tail[req_id] = progress.prompt_len % self.block_size
                self._planned_save_blocks += count
                self._with_saves.add(req_id)
        if computed_after_step >= progress.prompt_len:
            del self._saving[req_id]

    # ---- end of a request ----
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        for state in (self._hashes, self._tails, self._saving, self._planned_loads, self._loaded_blocks, self._lookups,
                      self._loading):  # fmt: skip
            state.pop(request_id, None)  # type: ignore[attr-defined]
        saved_tail_tokens = self._announced_tail.pop(request_id, 0)
        self._load_failed.discard(request_id)
        self._prefill_legs.discard(request_id)
        arrived = self._arrived.pop(request_id, None)
        announced = self._announced.pop(request_id, 0)
        if arrived is not None:
            logger.debug("[connector req=%s] in engine %.1f ms", request_id, (time.monotonic() - arrived) * 1000)
        # Saves run in the background: vLLM keeps the blocks until the worker reports them saved.
        hold_blocks = request_id in self._with_saves
        self._with_saves.discard(request_id)
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_decode"):
            return hold_blocks, None
        return hold_blocks, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "ds_worker_address": self.store.address,
            "num_saved_blocks": announced,
            "saved_tail_tokens": saved_tail_tokens,
            "layout": self.settings.layout.fingerprint(),
            "tp_size": self.settings.layout.tp_size,
        }

    def shutdown(self) -> None:
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def _other_tp(own: KVLayout, fingerprint: str, tp_size: Any) -> int | None:
    """``tp_size`` where ``fingerprint`` is our layout at that other TP size, else None."""
    try:
        tp = int(tp_size)
    except (TypeError, ValueError):
        return None
    return tp if tp != own.tp_size and own.with_tp(tp).fingerprint() == fingerprint else None
