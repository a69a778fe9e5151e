"""An engine that dies while starting is reported with its root cause: vLLM's API server
ends its log with "See root cause above", and the cause (e.g. a port taken by another
engine, which the actor retries on other ports) is many lines up."""

from __future__ import annotations

from pathlib import Path

from workers.engine_actor import ADDRESS_IN_USE
from workers.engine_process import failure_summary

_LOG = """INFO 12-06 01:28:20 [api_server.py] vLLM API server version 0.32.0
(EngineCore_DP0 pid=4121) ERROR 12-06 01:28:29 [core.py] EngineCore failed to start.
(EngineCore_DP0 pid=4121) Traceback (most recent call last):
(EngineCore_DP0 pid=4121)   File "zmq/sugar/socket.py", line 311, in bind
(EngineCore_DP0 pid=4121)     super().bind(addr)
(EngineCore_DP0 pid=4121) zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:41234')
Traceback (most recent call last):
""" + "\n".join(f'  File "vllm/v1/engine/core_client.py", line {n}, in __init__' for n in range(20)) + """
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: leaked shared_memory
"""


def test_the_root_cause_comes_first_then_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "decode-0.log"
    log.write_text(_LOG)
    summary = failure_summary(log, lines=3)
    assert summary.splitlines() == [
        "exceptions raised:",
        "  (EngineCore_DP0 pid=4121) zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:41234')",
        "  RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        "last log lines:",
        '  File "vllm/v1/engine/core_client.py", line 19, in __init__',
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: leaked shared_memory",
    ]
    assert ADDRESS_IN_USE in summary.lower()  # the actor starts the engine again on other ports


def test_a_log_without_a_traceback_is_tailed(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("\n".join(f"line {n}" for n in range(30)))
    assert failure_summary(log, lines=2) == "last log lines:\nline 28\nline 29"
    assert failure_summary(tmp_path / "absent.log") == "(no log)"
