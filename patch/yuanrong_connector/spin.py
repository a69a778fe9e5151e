"""Stop vLLM's engine processes from spinning a shared CPU between steps.

vLLM (0.32) passes each step between the EngineCore and its worker processes through a
shared-memory queue. After every message, a reader busy-waits (``sched_yield`` in a
loop) for ``SpinCondition.busy_loop_s`` = 1 s before it sleeps on a socket. On a GPU
host that costs an otherwise idle core; on a CPU host the engines' worker and
EngineCore share the cores with the forward pass, the API server and the data system
worker. Measured (2 cores, 1P1D, 93M model, 1.8K-token prompt): with the spin, the
decode's load of 14 freshly handed-over blocks took 40-480 ms and its leg 320-790 ms,
because the data system worker that must answer the load was starved by a prefill
worker still spinning after its last step and by the decode's own EngineCore; capped
at 0, the same leg took 200-380 ms.

``cap_reader_spin`` lowers the spin on every reader of this process, including those
created before it runs (the cap is applied on each wait). It is applied in the processes
that load the connector (EngineCore and workers) when the engine runs on CPU; a step's
wake-up then costs a socket poll (~0.1 ms) instead of a core.

A sleeping reader wakes on a ZeroMQ notification, and upstream re-checks the queue
only every ``SHM_READER_RECHECK_INTERVAL_MS`` (5 s) in case one is missed. With the spin
capped at 0 a missed wake-up showed (one decode leg of 5.46 s among 7), so the re-check
interval is lowered too (``_RECHECK_MS``): a missed wake-up then costs a few ms, and an
idle reader wakes ~100 times a second, which costs nothing measurable.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

_applied = False
_RECHECK_MS = 10


def cap_reader_spin(max_spin_s: float) -> bool:
    """Cap the busy-wait of vLLM's shared-memory queue readers in this process at
    ``max_spin_s``; False when this vLLM has no such reader (nothing to cap)."""
    global _applied
    try:
        from vllm.distributed.device_communicators import shm_broadcast
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    if _applied or not hasattr(SpinCondition, "wait"):
        return _applied
    upstream_wait = SpinCondition.wait

    @functools.wraps(upstream_wait)
    def wait_with_capped_spin(self: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "busy_loop_s", 0) > max_spin_s:
            self.busy_loop_s = max_spin_s
        upstream_wait(self, *args, **kwargs)

    SpinCondition.wait = wait_with_capped_spin  # type: ignore[method-assign]
    recheck_ms = getattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", None)
    if isinstance(recheck_ms, int) and recheck_ms > _RECHECK_MS:
        shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = _RECHECK_MS  # read at each wait
    _applied = True
    logger.info("[connector] vLLM's shared-memory queue readers spin at most %.3f s between steps (CPU engine)", max_spin_s)
    return True
