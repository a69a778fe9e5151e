"""The small interface between the front door and the role planner (ROLES=adaptive): the
door reports the service levels it observed and may set roles for an operator; the
control plane answers with the planner's decisions. deploy/serve.py wires the
Controller in; neither side imports the other."""

from __future__ import annotations

from typing import Protocol


class RoleControl(Protocol):
    def observe(self, levels: dict[str, object]) -> list[dict[str, object]]:
        """Report a window's service levels (``ServiceLevels.as_dict()``); the planner's
        decisions so far (``RoleDecision.as_dict()``), oldest first. Blocks (an actor call)."""
        ...

    def set_roles(self, roles: dict[str, str], reason: str) -> dict[str, object]:
        """Set engines' acting roles; the decision. ConfigError when refused. Blocks."""
        ...
