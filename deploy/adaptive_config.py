"""The checks of a ROLES=adaptive configuration (deploy/config.py runs them at the edge)."""

from __future__ import annotations

from common.config import YUANRONG_CONNECTOR, ServiceConfig
from common.errors import ConfigError


def check_adaptive(config: ServiceConfig) -> None:
    """ROLES=adaptive: engines alike (one TP size, one DP rank each), at least two, our connector."""
    engines = config.prefill_instances + config.decode_instances
    if engines < 2:
        raise ConfigError(f"ROLES=adaptive is invalid with {engines} engine: roles can only move between engines; "
                          "set PREFILL_INS_NUM + DECODE_INS_NUM >= 2, or ROLES=fixed")  # fmt: skip
    if config.decode_instances and config.prefill_tp != config.decode_tp:
        raise ConfigError(f"ROLES=adaptive is invalid with PTP={config.prefill_tp} DTP={config.decode_tp}: an engine "
                          "that changes roles keeps its TP size; set PTP=DTP, or ROLES=fixed")  # fmt: skip
    if max(config.prefill_dp, config.decode_dp) > 1:
        raise ConfigError(f"ROLES=adaptive is invalid with PDP={config.prefill_dp} DDP={config.decode_dp}: each engine "
                          "changes roles alone; set PDP=DDP=1 (more engines: PREFILL_INS_NUM), or ROLES=fixed")  # fmt: skip
    if config.connector.kind != YUANRONG_CONNECTOR:
        raise ConfigError(f"ROLES=adaptive is invalid with KV_CONNECTOR={config.connector.kind}: a decode leg on any "
                          f"engine loads its prompt through the data system; set KV_CONNECTOR={YUANRONG_CONNECTOR}")  # fmt: skip
    engines_max = config.planner.max_engines
    if engines_max and engines_max < max(config.planner.min_engines, engines):
        raise ConfigError(f"PLANNER_MAX_ENGINES={engines_max} is invalid: must be 0 (the planner never scales) or at "
                          f"least PLANNER_MIN_ENGINES={config.planner.min_engines} and PREFILL_INS_NUM + "
                          f"DECODE_INS_NUM={engines}")  # fmt: skip
