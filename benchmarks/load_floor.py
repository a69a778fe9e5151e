"""What a checked load's copies cost on this machine, without the store: the floor under
``bench connector-io``'s load figure.

    bash run_vllm_on_yr.sh bench load-floor [--blocks 32] [--layers 12] [--piece-kib 128] [--repeats 15] [--idle-ms 150] [--unbound]

A block's value (one piece per layer, the pieces one after another) is copied into a
cache where the block's pieces lie a layer apart, as the store helper copies a stored
value into a CPU engine's shared KV cache (``store_process._piece_moves``), on one thread
and on the helper's copy threads (``Copier``), with and without checking each value's
checksum first (``integrity.data_digest``, XXH3 of the xxhash wheel). The sources rotate
over three sets, so that each run reads memory the last one did not (cold, as a fresh
load's values are). Also timed: XXH3 over one value again and again (hot: its speed
when the bytes are in the CPU's caches) and over cold values. Before each run the
threads sleep ``--idle-ms``, as the helper's do between loads (0: back to back). The
copy threads are bound to a core each, as the helper's are (``--unbound``: not).
Medians and minimums of ``--repeats`` runs, in ms.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import numpy as np

from patch.yuanrong_connector.integrity import data_digest
from patch.yuanrong_connector.store_process import Copier, _move_all, _piece_moves


def _timed(run: Callable[[], object], repeats: int, idle_s: float) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        time.sleep(idle_s)
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--piece-kib", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--unbound", action="store_true", help="copy threads not bound to a core each (as before)")
    parser.add_argument("--idle-ms", type=float, default=150.0, help="sleep before each run, as the helper idles between loads")
    args = parser.parse_args()
    piece = args.piece_kib * 1024
    idle_s = args.idle_ms / 1000
    blocks, layers = args.blocks, args.layers
    value_bytes = piece * layers
    cache = np.ones(layers * blocks * 2 * piece, dtype=np.uint8)  # every other block, as real block tables scatter
    sources = np.random.default_rng(0).integers(0, 255, size=(3 * blocks, value_bytes), dtype=np.uint8)
    spans = [[((layer * 2 * blocks + 2 * block) * piece, piece) for layer in range(layers)] for block in range(blocks)]
    cache_address = cache.ctypes.data
    copier = Copier(bind=not args.unbound)
    turns = itertools.count()

    def next_values() -> np.ndarray:
        """The set of values the last two runs did not read: cold."""
        first = next(turns) % 3 * blocks
        return sources[first : first + blocks]

    def block_work(checked: bool) -> Callable[[int], bool]:
        values = next_values()

        def work(block: int) -> bool:
            if checked:
                data_digest(memoryview(values[block]))
            _move_all(_piece_moves(values[block].ctypes.data, cache_address, spans[block], to_cache=True))
            return True

        return work

    def on_one_thread(checked: bool) -> None:
        work = block_work(checked)
        for block in range(blocks):
            work(block)

    def hash_cold() -> None:
        for value in next_values():
            data_digest(memoryview(value))

    rows = {}
    for checked in (False, True):
        what = f"{'checksum + ' if checked else ''}copies"
        rows[f"one thread, {what}"] = _timed(lambda: on_one_thread(checked), args.repeats, idle_s)
        rows[f"{copier.threads} copy threads, {what}"] = _timed(lambda: copier.each(block_work(checked), blocks), args.repeats, idle_s)
    hot = memoryview(sources[0])
    rows["XXH3 only, hot (one value again and again)"] = _timed(lambda: [data_digest(hot) for _ in range(blocks)], args.repeats, idle_s)
    rows["XXH3 only, cold"] = _timed(hash_cold, args.repeats, idle_s)
    total_mib = blocks * value_bytes / 2**20
    print(f"{blocks} values of {value_bytes / 2**20:.2f} MiB ({layers} pieces of {args.piece_kib} KiB) = {total_mib:.0f} MiB;"
          f" median (min) of {args.repeats} runs, each after {args.idle_ms:.0f} ms idle")  # fmt: skip
    for name, (median, least) in rows.items():
        print(f"{name:48}{median:8.2f} ms ({least:.2f})")


if __name__ == "__main__":
    main()
