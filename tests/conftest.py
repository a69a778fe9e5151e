"""Fixtures shared by the component tests: a real data system worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import DataSystemConfig
from deploy.datasystem import start_worker, stop_worker
from testkit.helpers import free_port


@pytest.fixture(scope="session")
def ds_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataSystemConfig]:
    """A standalone data system worker on free loopback ports, stopped at the end."""
    settings = DataSystemConfig(
        worker_host="127.0.0.1",
        worker_port=free_port(),
        metastore_port=free_port(),
        shared_memory_mb=256,
        spill_dir=None,
        spill_size_mb=0,
    )
    home: Path = tmp_path_factory.mktemp("datasystem")
    start_worker(settings, home)
    try:
        yield settings
    finally:
        stop_worker(settings.address)


@pytest.fixture(scope="session")
def colocated_outputs() -> dict[int, dict[str, object]]:
    """Greedy outputs of a colocated deployment by prompt length, shared between e2e modules."""
    return {}
