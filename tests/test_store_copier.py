"""The store helper's copy threads: one per core the helper may run on, each bound to
its own core (unbound, threads woken after an idle spell shared one core; ``bench
load-floor``)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from patch.yuanrong_connector.integrity import data_digest
from patch.yuanrong_connector.store_process import Copier, _move_all, _piece_moves

CORES = sorted(os.sched_getaffinity(0))[:8]


@pytest.mark.skipif(len(CORES) < 2, reason="one core: the helper copies on its own thread")
def test_each_copy_thread_is_bound_to_a_core_of_its_own() -> None:
    def cores_of_each_thread(copier: Copier) -> list[frozenset[int]]:
        together = threading.Barrier(len(CORES), timeout=10)  # every run on a thread of its own

        def affinity(_: int) -> frozenset[int]:
            together.wait()
            return frozenset(os.sched_getaffinity(0))

        return copier.each(affinity, len(CORES))

    assert sorted(cores_of_each_thread(Copier()), key=min) == [frozenset({core}) for core in CORES]
    assert cores_of_each_thread(Copier(bind=False)) == [frozenset(CORES)] * len(CORES)


def test_copies_on_the_bound_threads_land_each_piece_in_place() -> None:
    blocks, layers, piece = 6, 3, 4096
    cache = np.zeros(layers * blocks * 2 * piece, dtype=np.uint8)
    values = np.random.default_rng(1).integers(0, 255, size=(blocks, layers * piece), dtype=np.uint8)
    spans = [[((layer * 2 * blocks + 2 * block) * piece, piece) for layer in range(layers)] for block in range(blocks)]

    def load(block: int) -> bool:
        _move_all(_piece_moves(values[block].ctypes.data, cache.ctypes.data, spans[block], to_cache=True))
        return data_digest(memoryview(values[block])) == data_digest(memoryview(values[block].copy()))

    assert Copier().each(load, blocks) == [True] * blocks
    for block in range(blocks):
        for layer, (offset, size) in enumerate(spans[block]):
            assert np.array_equal(cache[offset : offset + size], values[block][layer * piece : (layer + 1) * piece])
    assert cache.sum() == values.sum()  # nothing written outside the pieces
