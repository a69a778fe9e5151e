"""The data system SDK's client threads, back at the priority of the process using them.

openyuanrong-datasystem 0.8.1's client library starts its ZeroMQ IO threads (5
``ZmqEpoll`` and 5 ``ZmqPrefetcher`` per client process) at nice -15: its
``io_thread_nice`` flag, which the Python SDK gives no way to set. Those threads
busy-poll at times, and at nice -15 on a 2-core host they starve everything else, the
kernel's own workers included: dmesg showed "BUG: workqueue lockup - pool cpus=1 ...
stuck for 230s!" while engines froze for minutes and store calls went unanswered.
``calm_sdk_threads`` sets every thread of this process that runs above the process's
own priority back to it; it is called right after a client connects.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(f"vllm.{__name__}")


def thread_niceness(pid: int | str = "self") -> dict[int, int]:
    """Each thread of process ``pid``: its nice value (from /proc, field 19 of stat)."""
    niceness: dict[int, int] = {}
    task_dir = f"/proc/{pid}/task"
    for entry in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{entry}/stat") as stat:
                niceness[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[16])
        except (OSError, ValueError, IndexError):
            continue
    return niceness


def calm_sdk_threads() -> int:
    """Lower every thread above this process's priority to it; how many were lowered."""
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's: the process's own
    lowered = 0
    for tid, nice in thread_niceness().items():
        if nice < base:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, base)
                lowered += 1
            except OSError:
                continue
    if lowered:
        logger.info("lowered %d data system SDK thread(s) from above nice %d to it (they busy-poll)", lowered, base)
    return lowered
