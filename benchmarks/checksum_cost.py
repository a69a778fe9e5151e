"""What checking a loaded block's seal costs (integrity.py), against the copy that loads it.

    .venv/bin/python -m benchmarks.checksum_cost [--blocks 32] [--block-mib 1.5] [--repeats 15]

The default is a fresh 4K-token prompt of the ~93M benchmark model (32 blocks of
1.5 MiB, 48 MiB): per repeat, the blocks are copied into a cache-sized buffer (one
``memmove`` per block, as the store helper copies a loaded block into a CPU engine's
cache), checked with ``KV_CHECKSUM=1`` (xxh3-64 of every byte, key and length), and with
``KV_CHECKSUM=0`` (key and length only). Minimum, median and maximum of the repeats.
Results go to benchmarks/results/checksum_cost.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from patch.yuanrong_connector.integrity import SEAL_BYTES, seal, unseal

RESULTS = Path(__file__).resolve().parent / "results" / "checksum_cost.json"


def _timed(action: Callable[[], None], times: list[float]) -> None:
    started = time.perf_counter()
    action()
    times.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--block-mib", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    size = int(args.block_mib * 2**20)
    values = [memoryview(bytearray(os.urandom(size) + bytes(SEAL_BYTES))) for _ in range(args.blocks)]
    keys = [f"block-{i}" for i in range(args.blocks)]
    for value, key in zip(values, keys):
        seal(value, key)
    cache = np.empty(args.blocks * size, dtype=np.uint8)
    sources = [int(np.frombuffer(value, dtype=np.uint8).ctypes.data) for value in values]

    def copy() -> None:
        for i, source in enumerate(sources):
            ctypes.memmove(cache.ctypes.data + i * size, source, size)

    def check(check_bytes: bool) -> Callable[[], None]:
        def run() -> None:
            for value, key in zip(values, keys):
                assert unseal(value, key, check_bytes) is not None

        return run

    times: dict[str, list[float]] = {"copy": [], "checksum": [], "key_and_length": []}
    for _ in range(args.repeats):  # interleaved, so that the machine's drift falls on all three
        _timed(copy, times["copy"])
        _timed(check(True), times["checksum"])
        _timed(check(False), times["key_and_length"])
    summary = {name: {"min_ms": round(min(t) * 1e3, 3), "median_ms": round(statistics.median(t) * 1e3, 3),
                      "max_ms": round(max(t) * 1e3, 3)} for name, t in times.items()}  # fmt: skip
    ratio = statistics.median(times["checksum"]) / statistics.median(times["copy"])
    result = {"blocks": args.blocks, "block_bytes": size, "repeats": args.repeats, "ms": summary,
              "checksum_vs_copy_median": round(ratio, 3)}  # fmt: skip
    print(f"{args.blocks} blocks x {size / 2**20:.2f} MiB = {args.blocks * size / 2**20:.0f} MiB, {args.repeats} repeats")
    for name, figures in summary.items():
        print(f"  {name:16} min {figures['min_ms']:8.2f}  median {figures['median_ms']:8.2f}  max {figures['max_ms']:8.2f} ms")
    print(f"checksum / copy (medians): {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
