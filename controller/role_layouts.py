"""Layouts of an adaptive pool's acting roles, and the pure steps between them that the
role planner (controller/role_planner.py) and the Controller's roles
(controller/adaptive_roles.py) share: which engines take which role, which goes first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from common.service_levels import ServiceLevels
from controller.role_sizing import Need

Layout = tuple[int, int, int]  # engines acting prefill, decode, colocated


def initial_roles(names: list[str], prefill: int, decode: int) -> dict[str, str]:
    """The first ``prefill`` engines act prefill and the rest decode; with no decode
    engines asked for, all act colocated."""
    if decode <= 0:
        return {name: "colocated" for name in names}
    return {name: "prefill" if index < prefill else "decode" for index, name in enumerate(names)}


def after_removal(roles: Mapping[str, str], name: str) -> dict[str, str]:
    """The roles once ``name`` is gone: when the last engine of one role went, the rest
    serve whole requests (a split pool needs both)."""
    rest = {engine: role for engine, role in roles.items() if engine != name}
    acting = set(rest.values())
    if ("prefill" in acting) != ("decode" in acting):
        return {engine: "colocated" for engine in rest}
    return rest


def highest_numbered(names: list[str]) -> str:
    """The engine the scale path removes first: ``adaptive-10`` before ``adaptive-9``."""
    return max(names, key=lambda name: (int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else -1, name))


def layout_of(roles: Mapping[str, str]) -> Layout:
    values = list(roles.values())
    return values.count("prefill"), values.count("decode"), values.count("colocated")


def describe_layout(layout: Layout) -> str:
    prefill, decode, colocated = layout
    parts = [f"{prefill}P" if prefill else "", f"{decode}D" if decode else "", f"{colocated}C" if colocated else ""]
    return "+".join(part for part in parts if part) or "none"


def spared(roles: Mapping[str, str], name: str, need: Need, levels: ServiceLevels) -> dict[str, str] | None:
    """The roles with ``name`` in a role that can spare an engine (the sizing's ``need``):
    its own, or swapped with the least busy engine of the other; None if neither can."""
    role = roles[name]
    if role not in ("prefill", "decode"):
        return dict(roles)
    needed = {"prefill": need.prefill, "decode": need.decode}
    counts = Counter(roles.values())
    if counts[role] - 1 >= needed[role]:
        return dict(roles)
    other = "decode" if role == "prefill" else "prefill"
    swap = least_busy({engine: acting for engine, acting in roles.items() if engine != name}, other, levels, 1)
    if not swap or counts[other] - 1 < needed[other]:
        return None
    return {**roles, name: other, swap[0]: role}


def roles_of(layout: Layout, roles: Mapping[str, str], levels: ServiceLevels) -> dict[str, str]:
    """``roles`` moved to ``layout`` (as many engines): the prefill engines are those
    prefilling now, then the ones with the fewest requests in flight; the rest decode."""
    prefill, _, colocated = layout
    if colocated:
        return dict.fromkeys(roles, "colocated")
    order = sorted(roles, key=lambda name: (roles[name] != "prefill", levels.in_flight.get(name, 0), name))
    return {name: "prefill" if name in order[:prefill] else "decode" for name in roles}


def least_busy(roles: Mapping[str, str], role: str, levels: ServiceLevels, count: int) -> list[str]:
    """Of the engines acting ``role``, the ``count`` with the fewest requests in flight (then by name)."""
    return sorted((name for name, acting in roles.items() if acting == role),
                  key=lambda name: (levels.in_flight.get(name, 0), name))[:count]  # fmt: skip
