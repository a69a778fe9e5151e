"""Saving blocks in the background, so a step (and a prefill's response) never waits
for the store.

The worker hands each step's saves over after the forward pass; one thread writes
them, in order. vLLM keeps a finished request's blocks until ``finished_requests``
names it, so a block is never reused while it is being read. The scheduler half plans
saves within ``max_pending_blocks`` (it learns ``done_blocks`` each step); the bound is
enforced here too, as a safety net: past it new saves are skipped and counted, never
queued without end, and a full store skips saves instead of blocking them. The time
from a request's end to its last block being published is recorded (``publish``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from patch.yuanrong_connector.device_store import DeviceBlockStore
from patch.yuanrong_connector.remote_store import Store
from patch.yuanrong_connector.staging import HostStaging
from patch.yuanrong_connector.stats import YuanRongConnectorStats

logger = init_logger(f"vllm.{__name__}")


@dataclass(frozen=True)
class SaveJob:
    request_id: str
    keys: tuple[str, ...]
    block_ids: tuple[int, ...]
    marker: Any  # device event to wait for before reading the blocks (None on CPU)


class BackgroundSaver:
    def __init__(
        self, store: Store, staging: HostStaging, max_pending_blocks: int, device_store: DeviceBlockStore | None = None
    ) -> None:
        self._store = store
        self._staging = staging
        self._device_store = device_store  # Ascend: device-to-host in the data system
        self._max_pending_blocks = max_pending_blocks
        self._jobs: queue.Queue[SaveJob | None] = queue.Queue()
        self._dropping: set[str] = set()  # preempted: their queued saves are dropped, not run
        self._lock = threading.Condition()
        self._pending_blocks = 0
        self._pending_by_request: dict[str, int] = {}
        self._tracked: set[str] = set()  # requests with saves: vLLM holds their blocks until reported
        self._awaiting_finish: set[str] = set()  # finished in vLLM, saves still running
        self._done: set[str] = set()  # finished and saved: blocks may be freed
        self._finished_at: dict[str, float] = {}  # finished in vLLM, saves still running: since when
        self.done_blocks = 0  # blocks whose save ended, since start (read by the scheduler half)
        self._stats = YuanRongConnectorStats()
        self._thread = threading.Thread(target=self._run, name="yuanrong-kv-saver", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, keys: Sequence[str], block_ids: Sequence[int], marker: Any) -> None:
        with self._lock:
            self._tracked.add(request_id)
            if self._pending_blocks + len(keys) > self._max_pending_blocks:
                self._stats.add("blocks_save_skipped", len(keys))
                self.done_blocks += len(keys)
                logger.warning(
                    "[connector req=%s] save backlog full (%d blocks pending): skipping %d blocks",
                    request_id,
                    self._pending_blocks,
                    len(keys),
                )
                return
            self._pending_blocks += len(keys)
            self._pending_by_request[request_id] = self._pending_by_request.get(request_id, 0) + 1
        self._jobs.put(SaveJob(request_id, tuple(keys), tuple(block_ids), marker))

    def finished_requests(self, newly_finished: set[str]) -> set[str]:
        """Of the requests vLLM finished (now or before), those whose saves are all done.

        Only requests that had saves are ever reported: exactly those for which the
        scheduler side asked vLLM to hold the blocks."""
        with self._lock:
            for request_id in newly_finished & self._tracked:
                self._tracked.discard(request_id)
                if self._pending_by_request.get(request_id, 0):
                    self._awaiting_finish.add(request_id)
                    self._finished_at[request_id] = time.monotonic()
                else:
                    self._done.add(request_id)
                    self._stats.time("publish", 0.0)
            done, self._done = self._done, set()
            return done

    def release(self, request_ids: set[str], warn_after_s: float) -> None:
        """Before the blocks of ``request_ids`` are reused (preempted): their saves not yet
        started are dropped, and a save under way is waited for, however long it takes (a
        store call is bounded, and a late one is fenced: ``remote_store``). Returning
        earlier would let the forward pass overwrite blocks a queued save then publishes
        under the old prefix's key."""
        warned = False
        with self._lock:
            self._dropping |= request_ids
            while any(self._pending_by_request.get(r, 0) for r in request_ids):
                if not self._lock.wait(warn_after_s) and not warned:
                    warned = True
                    logger.warning("[connector] saves of %s still running after %.0f s; the step waits for them",
                                   sorted(request_ids), warn_after_s)  # fmt: skip
            self._dropping -= request_ids

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every submitted save is done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending_blocks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    def take_stats(self) -> YuanRongConnectorStats:
        with self._lock:
            stats, self._stats = self._stats, YuanRongConnectorStats()
            return stats

    def close(self, timeout_s: float = 30.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                dropped = job.request_id in self._dropping
                if dropped:
                    self._stats.add("blocks_save_dropped", len(job.keys))
            try:
                if not dropped:
                    self._save(job)
            except Exception:
                logger.exception("[connector req=%s] saving %d blocks failed", job.request_id, len(job.keys))
                with self._lock:
                    self._stats.add("blocks_save_failed", len(job.keys))
            finally:
                with self._lock:
                    self._pending_blocks -= len(job.keys)
                    self.done_blocks += len(job.keys)
                    left = self._pending_by_request[job.request_id] - 1
                    if left:
                        self._pending_by_request[job.request_id] = left
                    else:
                        del self._pending_by_request[job.request_id]
                        if job.request_id in self._awaiting_finish:
                            self._awaiting_finish.discard(job.request_id)
                            self._done.add(job.request_id)
                            published = time.monotonic() - self._finished_at.pop(job.request_id)
                            self._stats.time("publish", published)
                            logger.debug("[connector req=%s] last block published %.1f ms after the request ended",
                                         job.request_id, published * 1000)
                    self._lock.notify_all()

    def _save(self, job: SaveJob) -> None:
        started = time.perf_counter()
        present = self._store.exists(job.keys)  # blocks another engine (or this one) stored already
        missing = [i for i, flag in enumerate(present) if not flag]
        keys = [job.keys[i] for i in missing]
        block_ids = [job.block_ids[i] for i in missing]
        result = None
        if keys and self._device_store is not None:
            result = self._device_store.save(keys, self._staging.cache, block_ids)
        elif keys:
            result = self._staging.save(self._store, keys, block_ids, job.marker)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._stats.add("blocks_save_present", len(job.keys) - len(keys))
            if result is not None:
                self._stats.add("blocks_save", result.stored)
                self._stats.add("bytes_save", result.stored * self._staging.cache.block_bytes)
                self._stats.add("blocks_save_skipped", result.skipped_full)
                self._stats.add("blocks_save_failed", result.failed)
                if result.stored:
                    self._stats.time("save", elapsed)
