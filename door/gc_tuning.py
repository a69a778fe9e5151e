"""Python's garbage collector tuned for the door's process."""

from __future__ import annotations

import gc

# The door makes many short-lived objects per request; Python's default thresholds
# (700, 10, 10) collect several times a request. Measured on the PD door under 16
# clients, each party in its own process: 299 -> 259 CPU us per request with these.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc_for_serving() -> None:
    """Before serving: move what start-up made out of the collector's way (``gc.freeze``,
    as vLLM's API server does) and collect gen 0 less often. Call in the door's process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
