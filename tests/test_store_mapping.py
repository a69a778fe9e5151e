"""The store helper fills its page tables of the data system's shared memory only when
that memory is all resident (a worker started with shared_memory_populate); against a
real worker, populated and not."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from patch.yuanrong_connector.store_mapping import resident, shared_mappings
from testkit.helpers import free_port


def test_shared_mappings_are_found_by_name(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000200000 rw-s 00000000 00:01 5 /memfd:datasystem (deleted)\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
        "7f0000300000-7f0000400000 rw-p 00000000 00:01 6 /memfd:datasystem (deleted)\n"
        "7f0000400000-7f0000500000 r--s 00000000 00:01 7 /memfd:yuanrong-kv-arena (deleted)\n"
    )
    assert shared_mappings(maps=maps) == [(0x7F0000000000, 0x7F0000200000)]  # private or other names: not the store's


def test_residency_of_touched_and_untouched_pages() -> None:
    fd = os.memfd_create("residency")
    os.ftruncate(fd, 4 * mmap.PAGESIZE)
    memory = mmap.mmap(fd, 4 * mmap.PAGESIZE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert not resident(start, start + 4 * mmap.PAGESIZE)
    memory[:] = b"\x01" * len(memory)
    assert resident(start, start + 4 * mmap.PAGESIZE)


@pytest.fixture(params=[True, False], ids=["populated-worker", "lazy-worker"])
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DataSystemConfig, bool]]:
    """A worker populating its shared memory (started here), or the suite's lazy one."""
    if not request.param:
        yield request.getfixturevalue("ds_worker"), False
        return
    settings = DataSystemConfig(worker_host="127.0.0.1", worker_port=free_port(), metastore_port=free_port(),
                                shared_memory_mb=64, spill_dir=None, spill_size_mb=0, populate_shared_memory=True)  # fmt: skip
    start_worker(settings, tmp_path_factory.mktemp("mapping-datasystem"))
    try:
        yield settings, True
    finally:
        stop_worker(settings.address)


_PROBE = """
import json, sys
from patch.yuanrong_connector.store import BlockStore
from patch.yuanrong_connector.store_mapping import populate_store_mappings, shared_mappings
store = BlockStore(sys.argv[1])
assert store.connect()
def fill(first, buffers):
    for buffer in buffers:
        buffer[:] = b"x" * len(buffer)
assert store.put(["mapping-probe"], 4096, fill).stored == 1
mapped = sum(end - start for start, end in shared_mappings())
covered = populate_store_mappings()
resident_kib, inside = 0, False  # what this process now maps of the store: smaps' Rss of those mappings
for line in open("/proc/self/smaps"):
    if "-" in line.split(" ", 1)[0]:
        inside = "datasystem" in line and line.split()[1][3] == "s"
    elif inside and line.startswith("Rss:"):
        resident_kib += int(line.split()[1])
print(json.dumps({"mapped": mapped, "covered": covered, "mapped_in_kib": resident_kib}))
"""


def test_page_tables_filled_only_over_resident_memory(worker: tuple[DataSystemConfig, bool]) -> None:
    settings, populated = worker
    # A fresh process: this one may map other tests' workers.
    probe = subprocess.run([sys.executable, "-c", _PROBE, settings.address], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert figures["mapped"] >= 64 << 20  # the SDK maps the worker's whole shared memory
    assert figures["covered"] == (figures["mapped"] if populated else 0)
    if populated:
        assert figures["mapped_in_kib"] * 1024 == figures["mapped"]  # every page table entry filled
    else:
        assert figures["mapped_in_kib"] * 1024 < figures["mapped"] // 2  # only what the put touched
