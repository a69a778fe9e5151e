"""Another client of a data system worker, in a process of its own, rewriting a stored
value: how the integrity tests corrupt a block."""

from __future__ import annotations

import subprocess
import sys

_STRAY_WRITER = """
import sys
from yr.datasystem import KVClient
host, port, op, key, other = sys.argv[1:]
client = KVClient(host, int(port))
client.init()
(value,) = client.get([other if op == "copy" else key])
value = bytearray(value)
if op == "flip":
    value[100] ^= 0x10  # one bit of the block's data
client.delete([key])  # the worker keeps a key's write mode: delete, then set
client.set(key, bytes(value))
"""


def stray_write(address: str, op: str, key: str, other: str = "") -> None:
    """Another client of the worker, in a process of its own, rewrites ``key``'s stored
    value: ``flip`` one bit of its data, or ``copy`` ``other``'s value over it."""
    host, _, port = address.rpartition(":")
    subprocess.run([sys.executable, "-c", _STRAY_WRITER, host, port, op, key, other], check=True, timeout=60)
