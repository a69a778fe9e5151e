"""openYuanrong runtime set-up: cluster mode when a cluster is reachable, else local mode."""

from __future__ import annotations

import logging

import yr

from deploy.config import ServiceConfig

logger = logging.getLogger(__name__)


def init_yr(config: ServiceConfig) -> str:
    """Initialise the yr SDK; return the mode used ("cluster" or "local")."""
    if config.cluster_mode:
        yr.init(yr.Config(server_address=config.yr_server_address))
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
