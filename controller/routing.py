"""The front door's routing table: which engines serve which role, picked round robin.

The table is built from the Controller's engine list, so the per-request path never
calls an actor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    name: str
    role: str
    url: str


class RoundRobin:
    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self._cycle = itertools.cycle(endpoints) if endpoints else None

    def pick(self) -> Endpoint:
        if self._cycle is None:
            raise LookupError("no engine of this role")
        return next(self._cycle)


class RoutingTable:
    def __init__(self, engines: Iterable[Mapping[str, object]]) -> None:
        by_role: dict[str, list[Endpoint]] = {"prefill": [], "decode": [], "colocated": []}
        for engine in engines:
            endpoint = Endpoint(str(engine["name"]), str(engine["role"]), f"http://{engine['host']}:{engine['port']}")
            by_role[endpoint.role].append(endpoint)
        self.prefill = RoundRobin(by_role["prefill"])
        self.decode = RoundRobin(by_role["decode"])
        self.colocated = RoundRobin(by_role["colocated"])

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill.endpoints and self.decode.endpoints)

    @property
    def ready(self) -> bool:
        return self.disaggregated or bool(self.colocated.endpoints)

    def all_endpoints(self) -> list[Endpoint]:
        return self.prefill.endpoints + self.decode.endpoints + self.colocated.endpoints
