"""The small interface between the front door and scaling (data plane and control plane).

The door's ``/admin/scale`` checks a request with what is here and hands it to a
``ScaleControl``; the control plane's ``Scaler`` is one, and ``deploy/serve.py`` wires
it in. The Scaler sees the door through a ``DoorView``. Neither side imports the other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from common.errors import ConfigError, DeployError

MAX_SCALE_STEP = 8  # instances one operation may add or remove
ROLE_WORDS = ("prefill", "decode", "colocated", "adaptive")


def parse_delta(text: str) -> int:
    """``+1``, ``-2``, ``3``: a non-zero integer of at most MAX_SCALE_STEP either way."""
    if not re.fullmatch(r"[+-]?\d{1,6}", text.strip()) or not check_delta(int(text)):
        raise ConfigError(f"scale count {text!r} is invalid: must be +N or -N with N from 1 to {MAX_SCALE_STEP} "
                          "(+1 adds an instance, -1 drains and removes one)")  # fmt: skip
    return int(text)


def check_delta(delta: object) -> bool:
    return isinstance(delta, int) and not isinstance(delta, bool) and 0 < abs(delta) <= MAX_SCALE_STEP


# One row of the door's routing table as the Scaler sees it: (state, requests in flight).
EngineView = Mapping[str, tuple[str, int]]


class ScaleBusy(DeployError):
    """Another scale operation is under way (the door answers 409)."""


class DoorView(Protocol):
    """The door as the Scaler sees it from its thread."""

    def refresh_now(self) -> None:
        """Apply the Controller's engine list to the routing table now (returns when done)."""

    def engines(self) -> EngineView:
        """By engine name: its state and requests in flight in the routing table."""


@dataclass(frozen=True)
class Progress:
    operation: str  # e.g. "decode +1"
    phase: str  # e.g. "starting decode-1"
    started: float  # monotonic


class ScaleOutcome(Protocol):
    def to_dict(self) -> dict[str, object]: ...


class ScaleControl(Protocol):
    """What the door's admin endpoints ask of scaling."""

    @property
    def progress(self) -> Progress | None:
        """The operation under way, if any."""

    def scale(self, role_word: str, delta: int, door: DoorView) -> ScaleOutcome:
        """Add (delta > 0) or drain and remove instances; blocks until done. Raises
        ScaleBusy while another operation runs, ConfigError when refused."""
