"""A routing policy by its setting's name (ROUTING_POLICY)."""

from __future__ import annotations

from door.kv_policy import KVAware
from door.policies import POLICIES, Policy


def make_policy(name: str) -> Policy:
    if name == "kv_aware":  # requests without token ids: least outstanding (door/kv_policy.py)
        return KVAware()
    try:
        return POLICIES[name]()  # type: ignore[abstract]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}, kv_aware") from None
