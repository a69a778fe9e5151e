"""openYuanrong runtime set-up: cluster mode when a cluster is reachable, else local mode.

Also what the deploy process and ``clean`` ask of the cluster: its resource view (the
planner's inventory) and the detached, named Controller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yr

from common.config import ServiceConfig

logger = logging.getLogger(__name__)

# In cluster mode the Controller is a detached actor under this name, so that `clean`
# (another process, maybe after the deploy process is gone) can find it.
CONTROLLER_NAME = "Controller"
CONTROLLER_NAMESPACE = "vllm"
FIND_CONTROLLER_TIMEOUT_S = 10
STOP_CONTROLLER_TIMEOUT_S = 120


def init_yr(config: ServiceConfig) -> str:
    """Initialise the yr SDK; return the mode used ("cluster" or "local")."""
    if config.cluster_mode:
        yr.init(yr.Config(server_address=config.yr_server_address, ds_address=config.yr_ds_address or ""))
        mode = "cluster"
    else:
        # Dummy addresses stop the SDK from trying to start a cluster of its own first.
        yr.init(yr.Config(local_mode=True, server_address="127.0.0.1:1", ds_address="127.0.0.1:1"))
        mode = "local"
    logger.info("openYuanrong %s mode%s", mode, f" at {config.yr_server_address}" if config.cluster_mode else " (no cluster found: actors run in this process)")
    return mode


def finalize_yr() -> None:
    if yr.is_initialized():
        yr.finalize()


def resource_view(
    resources: Callable[[], Sequence[Mapping[str, object]]] = yr.resources,
) -> list[Mapping[str, object]] | None:
    """The cluster's nodes as ``yr.resources()`` reports them, or None when the runtime
    cannot say (local mode, or a function master that does not answer the query)."""
    try:
        return list(resources())
    except Exception as exc:  # the SDK raises RuntimeError, or its own errors, by version
        logger.warning("the cluster's resource view is unavailable (%s); placement is left to the scheduler", exc)
        return None


def stop_named_controller(
    get_instance: Callable[[str, str, int], Any] = yr.get_instance,
    get: Callable[..., Any] = yr.get,
) -> bool:
    """Stop the detached Controller by its name (its engines first, then the actor itself);
    False when no such actor runs. Needs an initialised SDK in cluster mode."""
    try:
        controller = get_instance(CONTROLLER_NAME, CONTROLLER_NAMESPACE, FIND_CONTROLLER_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        logger.info("no Controller named %s in namespace %s (%s)", CONTROLLER_NAME, CONTROLLER_NAMESPACE, exc)
        return False
    try:
        get(controller.shutdown.invoke(), timeout=STOP_CONTROLLER_TIMEOUT_S)
    finally:
        controller.terminate(is_sync=True)
    return True
