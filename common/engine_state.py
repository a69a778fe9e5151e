"""The states an engine is in, as its actor reports them and the door routes by them."""

from __future__ import annotations

import enum


class EngineState(enum.StrEnum):
    STARTING = "starting"  # its vLLM server is launching
    HEALTHY = "healthy"  # answering /health: the door routes to it
    UNHEALTHY = "unhealthy"  # missed health probes in a row; still supervised
    RESTARTING = "restarting"  # its process died; the actor relaunches it (with back-off)
    FAILED = "failed"  # could not be (re)started; the door routes nothing to it
    STOPPED = "stopped"  # stopped on purpose
    DRAINING = "draining"  # being removed: requests in flight finish, nothing new is routed to it
