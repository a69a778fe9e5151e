"""Loading blocks into vLLM's paged cache in the background (vLLM's asynchronous load).

The scheduler half parks a request whose blocks are to be loaded (vLLM state
WAITING_FOR_REMOTE_KVS) with its blocks allocated; ``submit`` hands them to one loader
thread, and the engine loop goes on. The thread first reads and copies a new load's
blocks at once, without asking whether they are there (a prefix reuse's were when the
scheduler looked, and a handoff's usually are by the time the decode is asked): one store
call. A load that found every block, may not wait (no handoff, cancelled, past its
deadline, store down) or met a corrupt block is decided then. The others, for all
pending loads together:
1. asks the store (one batched ``exist``) which blocks are published; a handed-over
   load whose blocks are not all there yet is asked about again (every 2 ms at first,
   backing off to 32 ms), up to its ``wait_s``;
2. reads the ready ones (one zero-copy ``get_read_only_buffers`` per batch) and copies
   every layer of every block into the cache (CPU: straight from shared memory; CUDA:
   through pinned memory on a side stream, synchronised before reporting; Ascend:
   the data system's device API);
   (blocks another TP size stored: its ranks' shards are read and this rank's heads
   assembled from them, ``HostStaging.load_resharded``);
3. reports the request done; blocks that did not come (not published in time, store
   down, wrong size) are reported failed, and vLLM computes them.
A request aborted while it waits stops waiting and is reported at once (vLLM frees
its blocks only then). Nothing here blocks the engine loop; ``wait_for_progress`` lets
an idle step (nothing to compute) sleep until a load ends instead of spinning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm.logger import init_logger

from patch.yuanrong_connector.device_store import DeviceBlockStore
from patch.yuanrong_connector.remote_store import Store
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats
from patch.yuanrong_connector.store import leading_blocks
from patch.yuanrong_connector.tp_layout import ReshardPlan

logger = init_logger(f"vllm.{__name__}")

# How often waiting handoffs ask the store whether their blocks are published: at first
# every 2 ms, then less often (doubling up to 32 ms) while nothing new comes, so a long
# wait does not flood the data system worker with calls it must answer.
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.032


@dataclass
class _Load:
    request_id: str
    keys: list[str]  # one per block, or with a plan one per block and source rank (block-major)
    block_ids: list[int]
    deadline: float
    submitted: float
    handoff: bool  # blocks announced by a prefill, perhaps still being published
    plan: ReshardPlan | None = None  # stored by another TP size: how this rank assembles its heads
    cancelled: bool = False
    tried: bool = False  # its first read (every block, unasked) was made

    @property
    def keys_per_block(self) -> int:
        return 1 if self.plan is None else len(self.plan.source_ranks)


@dataclass
class LoadOutcome:
    request_id: str
    failed_block_ids: set[int] = field(default_factory=set)


class BackgroundLoader:
    def __init__(self, store: Store, staging: HostStaging, device_store: DeviceBlockStore | None = None) -> None:
        self._store = store
        self._staging = staging
        self._device_store = device_store
        self._lock = threading.Condition()
        self._pending: dict[str, _Load] = {}
        self._outcomes: list[LoadOutcome] = []
        self._stats = YuanRongConnectorStats()
        self._stopping = False
        self._submitted = False  # a load came since the last poll: poll at the fast rate again
        self._thread = threading.Thread(target=self._run, name="yuanrong-kv-loader", daemon=True)
        self._thread.start()

    # ---- engine side ----
    def submit(
        self, request_id: str, keys: Sequence[str], block_ids: Sequence[int], wait_s: float, plan: ReshardPlan | None = None
    ) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending[request_id] = _Load(request_id, list(keys), list(block_ids), now + wait_s, now, wait_s > 0, plan)
            self._submitted = True
            self._lock.notify_all()

    def refuse(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Report a load that cannot be made as failed at once (vLLM computes its blocks)."""
        with self._lock:
            self._outcomes.append(LoadOutcome(request_id, set(block_ids)))
            self._lock.notify_all()

    def cancel(self, request_ids: set[str]) -> None:
        """Stop waiting for requests vLLM finished (aborted) while they were loading."""
        with self._lock:
            for request_id in request_ids & self._pending.keys():
                self._pending[request_id].cancelled = True
            self._lock.notify_all()

    def take_outcomes(self) -> list[LoadOutcome]:
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
            return outcomes

    def wait_for_progress(self, timeout_s: float) -> None:
        """Sleep until a load ends or ``timeout_s`` passes (only while loads are pending)."""
        with self._lock:
            if self._pending and not self._outcomes:
                self._lock.wait_for(lambda: bool(self._outcomes) or not self._pending, timeout_s)

    def take_stats(self) -> YuanRongConnectorStats:
        with self._lock:
            stats, self._stats = self._stats, YuanRongConnectorStats()
            return stats

    def close(self, timeout_s: float) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout_s)

    # ---- loader thread ----
    def _run(self) -> None:
        poll_s = _POLL_MIN_S
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or bool(self._pending))
                if self._stopping:
                    return
                if self._submitted:
                    poll_s, self._submitted = _POLL_MIN_S, False
                loads = list(self._pending.values())
            loads = [load for load in loads if not self._tried_at_once(load)]
            if not loads:
                continue
            try:
                ready, decided = self._ready(loads)
            except Exception:
                logger.exception("[connector] asking the store for %d loads failed; vLLM recomputes their blocks", len(loads))
                ready, decided = [(load, 0) for load in loads], time.monotonic()
                for load in loads:
                    self._report(load, LoadOutcome(load.request_id, set(load.block_ids)))
            else:
                for load, present in ready:
                    try:
                        self._finish(load, present, waited=decided - load.submitted)
                    except Exception:
                        logger.exception("[connector req=%s] loading failed; vLLM recomputes its blocks", load.request_id)
                        self._report(load, LoadOutcome(load.request_id, set(load.block_ids)))
            if len(ready) < len(loads):
                decided_ids = {load.request_id for load, _ in ready}
                nearest_deadline = min(load.deadline for load in loads if load.request_id not in decided_ids)
                # Wake at the nearest deadline, not up to a poll period after it.
                until_deadline = max(0.0, nearest_deadline - time.monotonic())
                with self._lock:
                    self._lock.wait(min(poll_s, until_deadline))  # a new load or a cancellation wakes it early
                poll_s = min(poll_s * 2, _POLL_MAX_S) if not ready else _POLL_MIN_S

    def _ready(self, loads: list[_Load]) -> tuple[list[tuple[_Load, int]], float]:
        """Loads that can go now, each with its count of leading blocks published, and when that was known."""
        keys = [key for load in loads for key in load.keys]
        present = self._store.exists(keys)
        now = time.monotonic()
        ready: list[tuple[_Load, int]] = []
        offset = 0
        for load in loads:
            flags = present[offset : offset + len(load.keys)]
            offset += len(load.keys)
            leading = leading_blocks(flags, load.keys_per_block)
            if leading == len(load.block_ids) or load.cancelled or now >= load.deadline or not self._store.available:
                ready.append((load, leading))
        return ready, now

    def _tried_at_once(self, load: _Load) -> bool:
        """``_loaded_at_once``; a load whose try failed is reported failed (vLLM computes it)."""
        try:
            return self._loaded_at_once(load)
        except Exception:
            logger.exception("[connector req=%s] loading failed; vLLM recomputes its blocks", load.request_id)
            self._report(load, LoadOutcome(load.request_id, set(load.block_ids)))
            return True

    def _loaded_at_once(self, load: _Load) -> bool:
        """A new load's first try: every block read and copied in one store call, unasked.
        True when that decided it (reported); False for a load tried before, and for a
        handoff some of whose blocks are not published yet (it waits, then the blocks are
        read again). Not for blocks another TP size stored, nor the Ascend device path."""
        if load.tried or load.cancelled or load.plan is not None or self._device_store is not None:
            return False
        load.tried = True
        tried_at = time.monotonic()
        started = time.perf_counter()
        failed = self._copy_in(load.keys, load.block_ids, None)
        seconds = time.perf_counter() - started
        corrupt = self._store.take_corrupt()
        if failed and not corrupt and load.handoff and tried_at < load.deadline and self._store.available:
            return False
        self._record(load, failed, seconds, corrupt, waited=tried_at - load.submitted)
        return True

    def _finish(self, load: _Load, present: int, waited: float) -> None:
        """Copy a decided load in; ``waited`` is its wait for publication (not the copies of loads before it)."""
        if load.cancelled:
            self._report(load, LoadOutcome(load.request_id, set(load.block_ids)))
            return
        if present < len(load.block_ids) and self._store.available:
            logger.warning(
                "[connector req=%s] %d of %d handed-over blocks published after %.0f ms; computing the rest",
                load.request_id,
                present,
                len(load.block_ids),
                waited * 1000,
            )
        started = time.perf_counter()
        failed = set(load.block_ids[present:])
        failed |= self._copy_in(load.keys[: present * load.keys_per_block], load.block_ids[:present], load.plan)
        self._record(load, failed, time.perf_counter() - started, self._store.take_corrupt(), waited)

    def _record(self, load: _Load, failed: set[int], seconds: float, corrupt: int, waited: float) -> None:
        """Count a decided load and report it: ``failed`` its blocks not loaded, ``seconds``
        its copies, ``corrupt`` the values found corrupt, ``waited`` its wait for publication."""
        loaded = len(load.block_ids) - len(failed)
        with self._lock:
            self._stats.add("blocks_load_corrupt", corrupt)
            self._stats.add("blocks_load", loaded)
            self._stats.add("bytes_load", loaded * self._staging.cache.block_bytes)
            self._stats.add("blocks_load_failed", len(failed))
            if load.handoff:
                self._stats.time("handoff_wait", waited)
            if loaded:
                self._stats.time("load", seconds)
        logger.debug(
            "[connector req=%s] waited %.1f ms for %d blocks, loaded %d in %.1f ms",
            load.request_id,
            waited * 1000,
            len(load.block_ids),
            loaded,
            seconds * 1000,
        )
        self._report(load, LoadOutcome(load.request_id, failed))

    def _report(self, load: _Load, outcome: LoadOutcome) -> None:
        """Report a load's outcome to vLLM, once: a load no longer pending was reported."""
        with self._lock:
            if self._pending.get(load.request_id) is not load:
                return
            del self._pending[load.request_id]
            self._outcomes.append(outcome)
            self._lock.notify_all()

    def _copy_in(self, keys: list[str], block_ids: list[int], plan: ReshardPlan | None) -> set[int]:
        """Copy stored blocks into the cache; return the block ids that could not be."""
        if plan is not None:
            return self._staging.load_resharded(self._store, keys, block_ids, plan)
        if self._device_store is not None and keys:  # Ascend: the data system writes device memory itself
            return self._device_store.load(keys, self._staging.cache, block_ids)
        return self._staging.load(self._store, keys, block_ids)
