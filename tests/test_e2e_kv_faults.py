"""End to end, short variant of the KV fault injection (tests/kv_faults.py; every phase
and more requests: ``python -m tests.kv_faults --seed N``): on one real 1P1D deployment
(float32, a decode cache small enough to preempt, prefix reuse on), store helpers frozen
past their bound mid-load and mid-save, then stored blocks with a bit flipped by a second
client. Zero wrong outputs against the engine computing alone, and every block left in
the store equal to a recompute of its tokens (zero poisoned)."""

from __future__ import annotations

import pytest

from testkit.deployment import deployed
from tests.kv_faults import FAULT_SETTINGS, TABLE_HEAD, run_phase

pytestmark = pytest.mark.e2e


def test_kv_faults_short(tmp_path_factory: pytest.TempPathFactory) -> None:
    with deployed(tmp_path_factory.mktemp("kv-faults"), **FAULT_SETTINGS) as deployment:
        reports = [run_phase(deployment, phase, requests=12, concurrency=6, seed=1) for phase in ("frozen-helper", "flipped-block")]
    print(TABLE_HEAD)
    for report in reports:
        print(report.row())
    for report in reports:
        assert (report.phase, report.wrong, report.poisoned, report.errors) == (report.phase, [], [], [])
        assert report.completed == 12
        assert report.faults > 0  # the fault was injected
        assert report.checked_blocks > 0  # blocks were left to check
