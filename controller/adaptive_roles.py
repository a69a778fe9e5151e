"""The acting roles of a ROLES=adaptive deployment's engines, as the Controller keeps them:
what the planner (controller/role_planner.py) or an operator (``POST /admin/roles``)
decided, and the decisions made, newest last. A change is a new routing table for the
door: no engine restarts, and requests in flight finish where they are."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping

from common.config import PlannerConfig, SloConfig
from common.errors import ConfigError
from common.service_levels import ACTING_ROLES, ServiceLevels
from controller.role_layouts import after_removal, describe_layout, initial_roles, layout_of
from controller.role_planner import RoleDecision, RolePlanner

logger = logging.getLogger(__name__)

DECISIONS_KEPT = 200


class AdaptiveRoles:
    def __init__(self, names: list[str], prefill: int, decode: int, slo: SloConfig, planner: PlannerConfig,
                 streams_per_engine: int = 0) -> None:  # fmt: skip
        """``streams_per_engine``: what the operator says an engine holds (MAX_IN_FLIGHT_PER_ENGINE), the
        planner's guess for a decode engine until it measured one."""
        self.acting: dict[str, str] = initial_roles(names, prefill, decode)
        self.planner = RolePlanner(slo, settle_s=planner.settle_s, min_engines=planner.min_engines,
                                   max_engines=planner.max_engines, streams_prior=streams_per_engine)  # fmt: skip
        self.decisions: deque[dict[str, object]] = deque(maxlen=DECISIONS_KEPT)

    def observe(self, levels: ServiceLevels, now: float) -> RoleDecision | None:
        """The planner's decision on the door's window, applied; None: nothing to do."""
        decision = self.planner.decide(levels, self.acting, now)
        if decision is None:
            return None
        if decision.moved:
            self.acting = dict(decision.roles)
            logger.info("role planner: %s -> %s (%s)", ", ".join(f"{name} {old}->{new}" for name, (old, new)
                        in decision.moved.items()), describe_layout(layout_of(self.acting)), decision.reason)  # fmt: skip
        if decision.scale:
            logger.info("role planner: scale adaptive %+d (%s)", decision.scale, decision.reason)
        elif not decision.moved:
            logger.warning("role planner: %s", decision.reason)
        self.decisions.append(decision.as_dict())
        return decision

    def set(self, roles: Mapping[str, str], reason: str, now: float) -> RoleDecision:
        """Roles an operator asked for (engines not named keep theirs); ConfigError if a
        name or role is unknown."""
        unknown = sorted(set(roles) - set(self.acting))
        if unknown:
            raise ConfigError(f"engine(s) {', '.join(unknown)} are not adaptive engines of this deployment; "
                              f"they are: {', '.join(self.acting) or 'none'}")  # fmt: skip
        for name, role in roles.items():
            if role not in ACTING_ROLES:
                raise ConfigError(f"role {role!r} for {name} is invalid: must be one of {', '.join(ACTING_ROLES)}")
        target = {**self.acting, **roles}
        acting = set(target.values())
        if ("prefill" in acting) != ("decode" in acting):
            raise ConfigError(f"roles {describe_layout(layout_of(target))} are invalid: a pool with prefill engines "
                              "needs decode engines and the other way round (or make them colocated)")  # fmt: skip
        if "colocated" in acting and len(acting) > 1:
            raise ConfigError(f"roles {describe_layout(layout_of(target))} are invalid: colocated engines do not mix "
                              "with prefill and decode ones; make them all colocated, or each prefill or decode")  # fmt: skip
        moved = {name: (self.acting[name], role) for name, role in target.items() if self.acting[name] != role}
        self.acting = target
        self.planner.changed(now)
        decision = RoleDecision(at=now, roles=dict(target), reason=reason, moved=moved)
        logger.info("roles set: %s -> %s (%s)", ", ".join(f"{name} {old}->{new}" for name, (old, new) in moved.items())
                    or "no change", describe_layout(layout_of(target)), reason)  # fmt: skip
        self.decisions.append(decision.as_dict())
        return decision

    def added(self, names: list[str], now: float) -> None:
        """New engines (scale-out): in a split pool they take the role the planner found
        short when it asked for them (decode when an operator did), else serve whole requests."""
        split = any(role != "colocated" for role in self.acting.values())
        short = self.planner.new_role if self.planner.new_role != "colocated" else "decode"
        for name in names:
            self.acting[name] = short if split else "colocated"
        self.planner.new_role = "colocated"
        self.planner.changed(now)

    def removed(self, name: str, now: float) -> None:
        self.acting = after_removal(self.acting, name)
        self.planner.changed(now)
