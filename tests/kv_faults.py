"""KV fault injection on real engines: wrong KV is never served and never left in the store.

A 1P1D deployment (float32 embedded model, a decode KV cache small enough to preempt,
prefix reuse on both engines) serves concurrent requests whose prompts share prefixes,
while one kind of fault is injected per phase:

- ``frozen-helper``: one of the engines' store helpers after another is frozen (SIGSTOP)
  for longer than its call bound, mid-load or mid-save, then let go (SIGCONT);
- ``flipped-block``: a second client of the data system flips one bit of stored blocks
  of prompts already sent;
- ``worker-killed``: the data system worker is killed (SIGKILL) mid-run and restarted
  empty at the same address;
- ``dtype-mix``: a second deployment whose prefill computes in bfloat16 and whose decode
  in float32 shares one worker: the prefill's blocks are never the decode's (outputs come
  from the float32 decode and are judged against it alone; its blocks against a bfloat16
  recompute, with bfloat16's tolerance).

Every completed greedy output must equal the engine computing the same prompt alone
(with a ``cache_salt`` of its own, so it neither reuses nor loads anything). Afterwards
every block the store holds for the phase's prompts is read back: one whose seal does not
match (integrity.py: an engine would compute it, never load it) is *rejected*; one whose
seal matches is compared with a recompute of the same tokens (the prefill engine computes
the prompt alone, again under a salt, and stores it under salted keys), and one that
differs is *poisoned*: an engine would load it as right.

    .venv/bin/python -m tests.kv_faults --seed 0                        # every phase
    .venv/bin/python -m tests.kv_faults --seed 1 --phases flipped-block --requests 40

Reports, per phase: completed, recomputed blocks (loads reported failed or corrupt),
wrong outputs (must be 0), blocks checked, rejected and poisoned (must be 0), faults
injected.
The short variant runs in the suite (tests/test_e2e_kv_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from deploy.config import build_config
from deploy.datasystem import start_worker, worker_home
from door.legs import prefill_request
from patch.yuanrong_connector.integrity import SEAL_BYTES, unseal
from patch.yuanrong_connector.keys import block_key, chain_root, chained_block_hashes
from testkit.deployment import BLOCK_SIZE, ENGINE_PARAMS, Deployment, deployed
from testkit.helpers import freeze, pids_matching, process_tree
from testkit.metrics import metric
from tests.kv_torture import make_prompts

PHASES = ("frozen-helper", "flipped-block", "worker-killed", "dtype-mix")
REQUEST_TIMEOUT_MS = 500
# A store call's bound in the helpers (remote_store): a save's is 2 SDK calls + 0.5 s.
HELPER_BOUND_S = 2 * REQUEST_TIMEOUT_MS / 1000 + 0.5
FAULT_SETTINGS = {
    "PREFILL_STARTUP_PARAMS": f"{ENGINE_PARAMS} --max-model-len 1024",
    "DECODE_STARTUP_PARAMS": f"{ENGINE_PARAMS} --max-model-len 1024 --num-gpu-blocks-override 16",
    "USING_PREFIX_CONNECTOR": "1",
    "KV_HANDOFF_WAIT_MS": "1500",
    "KV_REQUEST_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS),
}
DTYPE_MIX_SETTINGS = {**FAULT_SETTINGS, "PREFILL_STARTUP_PARAMS": "--enforce-eager --dtype bfloat16 --max-model-len 1024"}
# How far a stored block may be from its recompute, relative to the largest value: batching
# moves float32 values by ~1e-6 and bfloat16 ones by an ulp or two (~1%); another prompt's
# block differs by whole units.
POISON_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


@dataclass
class PhaseReport:
    phase: str
    completed: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    recomputed_blocks: float = 0.0
    checked_blocks: int = 0
    rejected_blocks: int = 0  # left in the store with a seal that does not match: never loaded
    poisoned: list[str] = field(default_factory=list)
    faults: int = 0

    @property
    def passed(self) -> bool:
        return not self.wrong and not self.errors and not self.poisoned and self.completed > 0

    def row(self) -> str:
        return (f"| {self.phase} | {self.completed} | {self.recomputed_blocks:.0f} | {len(self.wrong)} | "
                f"{self.checked_blocks} | {self.rejected_blocks} | {len(self.poisoned)} | {self.faults} | {len(self.errors)} |")  # fmt: skip


TABLE_HEAD = ("| phase | completed | recomputed blocks | wrong | blocks checked | rejected | poisoned | faults | errors |\n"
              "|---|---|---|---|---|---|---|---|---|")  # fmt: skip


class _Store:
    """A second client of the deployment's data system worker (raw bytes)."""

    def __init__(self, address: str) -> None:
        from yr.datasystem import KVClient

        host, _, port = address.rpartition(":")
        self.client = KVClient(host, int(port))
        self.client.init()

    def present(self, keys: list[str]) -> list[bool]:
        try:
            return [bool(flag) for flag in self.client.exist(keys)]
        except RuntimeError:
            return [False] * len(keys)

    def read(self, key: str) -> bytes | None:
        try:
            (value,) = self.client.get([key])
        except RuntimeError:
            return None
        return bytes(value)

    def replace(self, key: str, value: bytes) -> bool:
        """Whether ``value`` now stands under ``key`` (False: an engine wrote the key again
        between the delete and the set, and the worker refused the set)."""
        try:
            self.client.delete([key])  # the worker keeps a key's write mode: delete, then set
            self.client.set(key, value)
        except RuntimeError:
            return False
        return True

    def delete(self, keys: list[str]) -> None:
        try:
            self.client.delete(keys)
        except RuntimeError:
            pass


def _body(model: str, prompt: list[int], max_tokens: int, salt: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if salt is not None:
        body["cache_salt"] = salt
    return body


def _text(response: httpx.Response) -> str:
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def _salt() -> str:
    return f"alone-{uuid.uuid4().hex}"


def layout_fingerprint(deployment: Deployment) -> str:
    """The prefill engine's layout fingerprint, as it announces it in a prefill leg."""
    body = prefill_request(_body(deployment.state.served_model_name, [11, 12, 13], 1, _salt()))
    response = httpx.post(f"{deployment.engine_url('prefill')}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["kv_transfer_params"]["layout"])


def _keys(fingerprint: str, prompt: list[int], salt: str | None = None) -> list[str]:
    root = chain_root(cache_salt=salt) if salt is not None else None
    return [block_key(fingerprint, 0, block_hash) for block_hash in chained_block_hashes(prompt, BLOCK_SIZE, root)]


def _until_saves_resume(deployment: Deployment, fingerprint: str, report: PhaseReport, timeout_s: float = 90) -> None:
    """Once a fault has ended: until the prefill engine's saves reach the store again (a
    probe prompt of 2 blocks, under a salt of its own, is found there), so that the
    requests sent after the fault store blocks to check (seen: a restarted worker, and
    the engines' stores still backing off from it, took none of the last third's saves)."""
    store = _Store(store_address(deployment))
    model, prefill = deployment.state.served_model_name, deployment.engine_url("prefill")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        salt, prompt = _salt(), [random.randrange(10, 4000) for _ in range(2 * BLOCK_SIZE)]
        httpx.post(f"{prefill}/v1/completions", json=prefill_request(_body(model, prompt, 1, salt)), timeout=180).raise_for_status()
        keys = _keys(fingerprint, prompt, salt)
        probe_deadline = time.monotonic() + 3
        while time.monotonic() < probe_deadline:
            if all(store.present(keys)):
                store.delete(keys)
                return
            time.sleep(0.1)
    report.errors.append(f"the prefill's saves did not reach the store within {timeout_s:.0f} s of the fault's end")


def _recomputed_blocks(deployment: Deployment) -> float:
    return sum(metric(deployment.engine_url(role), "vllm:yuanrong_kv_blocks_total", op=op)
               for role in ("prefill", "decode") for op in ("load_failed", "load_corrupt"))  # fmt: skip


# ---- faults ----
def _freeze_helpers(deployment: Deployment, stop: threading.Event, rng: random.Random) -> int:
    """Freeze one engine store helper after another for longer than its call bound."""
    engine_pids = [int(engine["pid"]) for engine in deployment.state.engines]  # type: ignore[call-overload]
    frozen = 0
    while not stop.is_set():
        tree = {pid for engine in engine_pids for pid in process_tree(engine)}
        helpers = [pid for pid in pids_matching("patch.yuanrong_connector.store_process") if pid in tree]
        if helpers:
            helper = rng.choice(helpers)
            try:
                freeze(helper)
                frozen += 1
                stop.wait(HELPER_BOUND_S + 0.2)
            except ProcessLookupError:
                continue
            finally:
                try:
                    os.kill(helper, signal.SIGCONT)
                except ProcessLookupError:
                    pass  # fenced: the engine killed it and started another
        stop.wait(0.1)
    return frozen


def _flip_blocks(store: _Store, fingerprint: str, sent: list[list[int]], stop: threading.Event, rng: random.Random) -> int:
    """Flip one bit of a stored block of a prompt already sent, again and again."""
    flipped = 0
    while not stop.is_set():
        stop.wait(0.2)
        if not sent:
            continue
        keys = _keys(fingerprint, rng.choice(sent))
        present = [key for key, flag in zip(keys, store.present(keys)) if flag]
        if not present:
            continue
        key = rng.choice(present)
        value = store.read(key)
        if value is None or len(value) <= SEAL_BYTES:
            continue
        changed = bytearray(value)
        changed[rng.randrange(len(value) - SEAL_BYTES)] ^= 1 << rng.randrange(8)
        if store.replace(key, bytes(changed)):
            flipped += 1
    return flipped


def _kill_worker(deployment: Deployment, stop: threading.Event, rng: random.Random) -> int:
    """Kill the data system worker once, mid-run, and start it again empty."""
    if stop.wait(rng.uniform(0.5, 1.5)):
        return 0
    settings = build_config(deployment.env).datasystem
    for pid in pids_matching(f"--worker_address={settings.address}"):
        os.kill(pid, signal.SIGKILL)
    time.sleep(2.0)
    home = worker_home(Path(deployment.env["RUN_DIR"]) / f"datasystem-killed-{uuid.uuid4().hex[:6]}", settings.address)
    start_worker(settings, home, settings.address, runs_metastore=True)
    return 1


@contextmanager
def _injecting(fault: Callable[[threading.Event], int], report: PhaseReport) -> Iterator[Callable[[bool], None]]:
    """Run ``fault`` beside the block; what it yields waits for the fault to end (told to
    stop first, or not: a fault that ends by itself)."""
    stop = threading.Event()
    count: list[int] = []
    thread = threading.Thread(target=lambda: count.append(fault(stop)), name="fault", daemon=True)

    def end(stop_now: bool = True) -> None:
        if stop_now:
            stop.set()
        thread.join(timeout=120)
        report.faults = count[0] if count else 0

    thread.start()
    try:
        yield end
    finally:
        end()


# ---- one phase ----
async def _send_all(deployment: Deployment, prompts: list[list[int]], lengths: list[int], expected: list[str],
                    concurrency: int, sent: list[list[int]], report: PhaseReport) -> None:  # fmt: skip
    gate = asyncio.Semaphore(concurrency)
    model = deployment.state.served_model_name

    async def one(index: int, client: httpx.AsyncClient) -> None:
        async with gate:
            try:
                response = await client.post(f"{deployment.url}/v1/completions", json=_body(model, prompts[index], lengths[index]))
            except httpx.HTTPError as exc:
                report.errors.append(f"request {index}: {exc!r}")
                return
            sent.append(prompts[index])
            if response.status_code != 200:
                report.errors.append(f"request {index}: HTTP {response.status_code} {response.text[:200]}")
                return
            report.completed += 1
            if _text(response) != expected[index]:
                report.wrong.append(f"request {index} ({len(prompts[index])} prompt tokens)")

    async with httpx.AsyncClient(timeout=180) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(prompts))))


def check_store(deployment: Deployment, store: _Store, fingerprint: str, prompts: list[list[int]], report: PhaseReport,
                dtype: str = "float32") -> None:  # fmt: skip
    """Every block stored for ``prompts`` against the prefill engine's recompute of it
    (each key once: prompts share prefixes)."""
    seen: set[str] = set()
    for prompt in prompts:
        keys = _keys(fingerprint, prompt)
        stored = {key: value for key in keys if key not in seen and (value := store.read(key)) is not None}
        seen.update(keys)
        if not stored:
            continue
        witnesses = _recompute(deployment, store, fingerprint, prompt, list(stored))
        for key, value in stored.items():
            witness = witnesses.get(key)
            if witness is None:
                report.errors.append(f"no recompute of {key} came to compare with")
                continue
            report.checked_blocks += 1
            if unseal(memoryview(value), key) is None:
                report.rejected_blocks += 1
            elif not _same_block(value, witness, dtype):
                report.poisoned.append(key)


def _recompute(deployment: Deployment, store: _Store, fingerprint: str, prompt: list[int], keys: list[str],
               tries: int = 3) -> dict[str, bytes]:  # fmt: skip
    """The prefill engine's blocks of ``prompt`` computed alone (under a salt of their own),
    by the key of the same block unsalted. A save may be skipped (a store call over its
    bound on a loaded machine: seen once in CI), so a block missing is computed again under
    another salt, up to ``tries`` times."""
    model = deployment.state.served_model_name
    prefill = deployment.engine_url("prefill")
    wanted = set(keys)
    found: dict[str, bytes] = {}
    for _ in range(tries):
        salt = _salt()
        response = httpx.post(f"{prefill}/v1/completions", json=prefill_request(_body(model, prompt, 1, salt)), timeout=180)
        response.raise_for_status()
        witness_keys = _keys(fingerprint, prompt, salt)
        deadline = time.monotonic() + 30
        while not all(store.present(witness_keys)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for key, witness_key in zip(_keys(fingerprint, prompt), witness_keys):
            if key in wanted and key not in found and (witness := store.read(witness_key)) is not None:
                found[key] = witness
        store.delete(witness_keys)
        if wanted <= found.keys():
            break
    return found


def _same_block(stored: bytes, recomputed: bytes, dtype: str) -> bool:
    if len(stored) != len(recomputed):
        return False
    a, b = _values(stored[:-SEAL_BYTES], dtype), _values(recomputed[:-SEAL_BYTES], dtype)
    scale = max(1.0, float(np.max(np.abs(b))))
    return bool(np.all(np.isfinite(a))) and float(np.max(np.abs(a - b))) <= POISON_TOLERANCE[dtype] * scale


def _values(data: bytes, dtype: str) -> np.ndarray:
    """A block's values as float32 (bfloat16 is float32's upper half)."""
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=np.float32)


def run_phase(deployment: Deployment, phase: str, requests: int, concurrency: int, seed: int) -> PhaseReport:
    rng = random.Random(f"{phase}-{seed}")
    # Where a fault stops saves for a while (a helper being replaced, the worker down), the
    # last third of the requests is sent once it has ended (the worker is back, the
    # helpers frozen no longer), so that blocks are also stored after it, and checked. Those
    # prompts have prefix groups of their own: heads the prefill engine already holds in its
    # device cache are not computed, so not saved, again (seen: a phase with 0 blocks checked).
    first = 2 * requests // 3 if phase in ("frozen-helper", "worker-killed") else requests
    prompt_seed = seed * 100 + PHASES.index(phase)
    prompts = make_prompts(first, prompt_seed) + make_prompts(requests - first, prompt_seed + 50)
    lengths = [rng.randrange(4, 32) for _ in prompts]
    model = deployment.state.served_model_name
    reference_url = deployment.engine_url("decode" if phase == "dtype-mix" else "prefill")
    with httpx.Client(timeout=300) as client:  # the engine computing alone, one prompt at a time
        expected = [_text(client.post(f"{reference_url}/v1/completions", json=_body(model, p, n, _salt())))
                    for p, n in zip(prompts, lengths)]  # fmt: skip
    fingerprint = layout_fingerprint(deployment)
    store = _Store(build_config(deployment.env).datasystem.address)
    report = PhaseReport(phase)
    recomputed_before = _recomputed_blocks(deployment)
    sent: list[list[int]] = []
    faults: dict[str, Callable[[threading.Event], int]] = {
        "frozen-helper": lambda stop: _freeze_helpers(deployment, stop, rng),
        "flipped-block": lambda stop: _flip_blocks(_Store(store_address(deployment)), fingerprint, sent, stop, rng),
        "worker-killed": lambda stop: _kill_worker(deployment, stop, rng),
        "dtype-mix": lambda stop: 0,
    }
    with _injecting(faults[phase], report) as end_fault:
        asyncio.run(_send_all(deployment, prompts[:first], lengths[:first], expected[:first], concurrency, sent, report))
        if first < len(prompts):
            end_fault(phase == "frozen-helper")  # the worker's kill and restart end by themselves
            _until_saves_resume(deployment, fingerprint, report)
            asyncio.run(_send_all(deployment, prompts[first:], lengths[first:], expected[first:], concurrency, sent, report))
    if phase == "worker-killed":
        store = _Store(store_address(deployment))  # the first client's worker is gone
    check_store(deployment, store, fingerprint, prompts, report, "bfloat16" if phase == "dtype-mix" else "float32")
    time.sleep(11)  # engines publish connector stats every 10 s
    report.recomputed_blocks = _recomputed_blocks(deployment) - recomputed_before
    return report


def store_address(deployment: Deployment) -> str:
    return build_config(deployment.env).datasystem.address


def run_phases(phases: list[str], requests: int, concurrency: int, seed: int, workdir: Path) -> list[PhaseReport]:
    reports = []
    shared = [phase for phase in phases if phase != "dtype-mix"]
    if shared:
        with deployed(workdir / f"faults-{seed}", **FAULT_SETTINGS) as deployment:
            reports += [run_phase(deployment, phase, requests, concurrency, seed) for phase in shared]
    if "dtype-mix" in phases:
        with deployed(workdir / f"faults-dtype-{seed}", **DTYPE_MIX_SETTINGS) as deployment:
            reports.append(run_phase(deployment, "dtype-mix", requests, concurrency, seed))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description="KV fault injection on real engines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=24, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = [phase for phase in phases if phase not in PHASES]
    if unknown:
        parser.error(f"--phases {','.join(unknown)} is invalid: must be among {', '.join(PHASES)}")
    reports = run_phases(phases, args.requests, args.concurrency, args.seed, Path(tempfile.mkdtemp(prefix="kv-faults-", dir="/tmp")))
    print(f"seed {args.seed}, {args.requests} requests per phase, concurrency {args.concurrency}")
    print(TABLE_HEAD)
    for report in reports:
        print(report.row())
        for line in report.wrong + report.poisoned + report.errors:
            print("   ", line)
    raise SystemExit(0 if all(report.passed for report in reports) else 1)


if __name__ == "__main__":
    main()
