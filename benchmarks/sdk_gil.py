"""Does a data system SDK call hold Python's GIL while it waits? One thread counts in a
loop while another calls ``KVClient.exist``: first against a worker that answers, then
against the same worker stopped with SIGSTOP, so that one call lasts its whole request
timeout. If the counting thread barely advances during that call, the SDK held the GIL,
and every Python thread of the calling process (in an engine: the model runner) waited.

    .venv/bin/python -m benchmarks.sdk_gil [--timeout-ms 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from testkit.helpers import free_port, pids_matching


def _count_while(call: object, seconds: float) -> tuple[int, int]:
    """(calls made, counts of the other thread) while ``call`` runs back to back for ``seconds``."""
    stop, counted = threading.Event(), [0]

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        counted[0] = n

    counter = threading.Thread(target=count)
    counter.start()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        try:
            call()  # type: ignore[operator]
        except Exception:
            pass
        calls += 1
    stop.set()
    counter.join()
    return calls, counted[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-ms", type=int, default=2000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sdk-gil-"))
    ds = DataSystemConfig("127.0.0.1", free_port(), free_port(), shared_memory_mb=256, spill_dir=None, spill_size_mb=0)
    start_worker(ds, home)
    try:
        from yr.datasystem import KVClient

        client = KVClient("127.0.0.1", ds.worker_port, connect_timeout_ms=args.timeout_ms, req_timeout_ms=args.timeout_ms)
        client.init()
        seconds = args.timeout_ms / 1000
        baseline = _count_while(lambda: time.sleep(0.005), seconds)[1]
        answering = _count_while(lambda: client.exist(["a", "b"]), seconds)
        worker = pids_matching(f"--worker_address={ds.address}")[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            stopped = _count_while(lambda: client.exist(["a", "b"]), seconds)
        finally:
            os.kill(worker, signal.SIGCONT)
    finally:
        stop_worker(ds.address)
        shutil.rmtree(home, ignore_errors=True)
    print(f"other thread's count over {seconds:.1f} s: {baseline:,} beside sleeps (the GIL free);")
    print(f"  {answering[1]:,} beside {answering[0]} exist calls to a worker that answers;")
    print(f"  {stopped[1]:,} beside {stopped[0]} exist call(s) to a stopped worker (each waits {args.timeout_ms} ms)")
    print(f"  -> the thread ran {stopped[1] / baseline:.0%} of the time while the SDK waited for the stopped worker")


if __name__ == "__main__":
    main()
