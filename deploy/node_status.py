"""What ``status`` shows of the nodes a deployment uses, below its engine table.

- :func:`node_rows`: one row per node that runs engines (the engines' host): the planner's
  node id, the devices its engines use, the data system worker(s) they attach to and
  whether those accept a connection, and the engines. A pure function of the state and a
  probe, which the caller passes in (``deploy.datasystem.worker_listens``).
- :func:`yr_status_lines`: in cluster mode, what ``yr status`` reports, indented, or one
  line saying why it is unavailable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from deploy.state import DeploymentState

NODE_HEADER = ("NODE", "ADDRESS", "DEVICES", "DS WORKER", "WORKER", "ENGINES")
YR_STATUS_TITLE = "openYuanrong (yr status):"
YR_STATUS_TIMEOUT_S = 10.0

# serve.py writes ds_worker_address as "each node's, port 31501" in cluster mode.
_NODE_WORKER_PORT = re.compile(r"port (\d+)$")


def table_lines(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows (the header first) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def engine_workers(state: DeploymentState) -> list[str]:
    """The data system worker of each engine in ``state.engines``, in their order ("" when
    none is known).

    Engines started by this version carry it (``ds_worker_address`` of their EngineInfo,
    completed with their node's address). For engine infos written before that, it is
    derived as it was assigned: in cluster mode the worker on the engine's own node,
    ``<host>:<DS_WORKER_PORT>`` (placement.engine_specs + engine_process.resolve_on_node);
    otherwise the state's workers in turn, counted per node in the engines' order (the
    planner's ``_assign``; state.engines keeps the plan's order).
    """
    listed = [a for a in state.ds_worker_address.split(",") if ":" in a] if state.ds_worker_address else []
    port = _NODE_WORKER_PORT.search(state.ds_worker_address or "")
    attached: dict[str, int] = {}  # per host, engines attached so far
    workers: list[str] = []
    for engine in state.engines:
        host = str(engine.get("host", ""))
        carried = str(engine.get("ds_worker_address") or "")
        if carried:
            workers.append(carried)
        elif state.yr_mode == "cluster" and port is not None:
            workers.append(f"{host}:{port.group(1)}")
        elif listed:
            workers.append(listed[attached.get(host, 0) % len(listed)])
        else:
            workers.append("")
        attached[host] = attached.get(host, 0) + 1
    return workers


def node_rows(state: DeploymentState, worker_answers: Callable[[str], bool]) -> list[tuple[str, ...]]:
    """One row per node running engines (NODE_HEADER's columns), nodes in the order of
    their first engine. A node is the engines' host, where they run; NODE is the planner's
    id for it ("-" when the runtime chose the node; in cluster mode the plan names the node
    it would choose, and the scheduler places the actor). ``worker_answers`` is asked once
    per worker."""
    nodes: dict[str, list[tuple[Mapping[str, object], str]]] = {}
    for engine, worker in zip(state.engines, engine_workers(state)):
        nodes.setdefault(str(engine.get("host", "")), []).append((engine, worker))
    answers: dict[str, bool] = {}
    rows: list[tuple[str, ...]] = []
    for host, engines in nodes.items():
        node_ids = _unique(str(e.get("node_id") or "") for e, _ in engines)
        devices = sorted({int(d) for e, _ in engines for d in e.get("devices") or ()})  # type: ignore[attr-defined]
        workers = _unique(w for _, w in engines)
        for worker in workers:
            if worker not in answers:
                answers[worker] = worker_answers(worker)
        silent = [w for w in workers if not answers[w]]
        if not workers:
            reach = "-"
        elif not silent:
            reach = "answers"
        elif len(silent) == len(workers):
            reach = "not answering"
        else:
            reach = f"not answering: {','.join(silent)}"
        rows.append((
            ",".join(node_ids) or "-", host or "-", ",".join(map(str, devices)) or "-", ",".join(workers) or "-",
            reach, ",".join(str(e["name"]) for e, _ in engines),
        ))  # fmt: skip
    return rows


def _unique(values: Iterable[str]) -> list[str]:
    """The non-empty values, each once, in their first order."""
    seen: list[str] = []
    for value in values:
        if value and value not in seen:
            seen.append(value)
    return seen


def yr_cli_path(which: Callable[[str], str | None] = shutil.which, python: str = sys.executable) -> str | None:
    """The ``yr`` CLI (openYuanrong's, the one ``yr start`` is), found as dscli is
    (deploy.datasystem.dscli_path): beside this Python, else on PATH; None: not installed."""
    beside_python = Path(python).parent / "yr"
    return str(beside_python) if beside_python.exists() else which("yr")


def yr_status_lines(
    state: DeploymentState,
    yr_path: str | None,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    timeout_s: float = YR_STATUS_TIMEOUT_S,
) -> list[str]:
    """Cluster mode: ``yr status``'s output indented under YR_STATUS_TITLE, or that title
    and why it is unavailable on one line. Local mode: nothing (there is no cluster)."""
    if state.yr_mode != "cluster":
        return []
    if yr_path is None:
        return [f"{YR_STATUS_TITLE} unavailable: no yr CLI on PATH (openYuanrong's, as for yr start)"]
    try:
        result = run([yr_path, "status"], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return [f"{YR_STATUS_TITLE} unavailable: {yr_path} status gave no answer within {timeout_s:.0f} s"]
    except OSError as exc:
        return [f"{YR_STATUS_TITLE} unavailable: {yr_path} status could not run ({exc.strerror or exc})"]
    output = (result.stdout + result.stderr).rstrip().splitlines()
    lines = [YR_STATUS_TITLE] + [f"    {line}" for line in output]
    if result.returncode != 0:
        lines.append(f"    (yr status exited with code {result.returncode})")
    return lines
