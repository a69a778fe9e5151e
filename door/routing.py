"""The front door's routing table: engines by role, their health and their requests in
flight, and the policy that orders them for a request.

The Controller owns the truth about engines (started, restarted, healthy or not); the
door copies it into this table from a background task (``update``), so the
per-request path never calls an actor. The door also marks an engine it could not
reach as failed for a short while (``mark_failed``), before the Controller notices.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from common.config import Role
from common.engine_state import EngineState
from common.service_levels import ACTING_ROLES
from door.door_metrics import DoorMetrics
from door.policies import EngineLoad, LeastOutstanding, Policy, RoundRobin

SUSPECT_S = 5.0
PREFILL_SLOTS = 2  # requests admitted per prefill engine of a split adaptive pool (``admission_slots``)
ADAPTIVE = Role.ADAPTIVE.value  # the deploy role of ROLES=adaptive engines
Ranker = Callable[[list[EngineLoad]], list[EngineLoad]]  # an engine the door could not reach is skipped this long


class RoutingTable:
    def __init__(
        self, engines: Iterable[Mapping[str, object]], policy: Policy | None = None, metrics: DoorMetrics | None = None
    ) -> None:
        self.policy: Policy = policy or RoundRobin()
        self._decode_policy = LeastOutstanding()  # decode is chosen by load
        self._metrics = metrics
        self._engines: dict[str, EngineLoad] = {}
        # Per role, kept by ``update`` (the request path reads them, never loops over every engine):
        self._by_role: dict[str, list[EngineLoad]] = {}
        self._healthy_by_role: dict[str, list[EngineLoad]] = {}  # state healthy (suspects not taken out)
        self._unhealthy_roles: set[str] = set()  # roles with a running engine that missed probes
        self._suspect_until: dict[str, float] = {}
        self._roles_seen: set[str] = set()
        self._in_flight: dict[tuple[str, str], Any] = {}  # (engine, role) -> its in-flight gauge child, made once
        self.version = -1
        self.adaptive = False  # ROLES=adaptive: engines route as their acting roles, which change
        self.update(engines)

    def update(self, engines: Iterable[Mapping[str, object]], version: int | None = None) -> None:
        """Replace the engine list. An engine that stays keeps its object, so requests in
        flight release the count they acquired (new objects would leak those counts)."""
        fresh: dict[str, EngineLoad] = {}
        for engine in engines:
            if engine.get("headless"):  # DP_MODE=vllm: ranks served through their head, no HTTP of their own
                continue
            name = str(engine["name"])
            known = self._engines.get(name) or EngineLoad(name=name, url="", role="")
            known.host = str(engine["host"])
            known.port = int(engine["port"])  # type: ignore[call-overload]
            known.url = f"http://{known.host}:{known.port}"
            known.events_port = int(engine.get("events_port", 0) or 0)  # type: ignore[call-overload]
            known.restarts = int(engine.get("restarts", 0) or 0)  # type: ignore[call-overload]
            known.role = str(engine["role"])
            # An adaptive engine acts in the role the Controller's planner gave it (colocated until it says).
            known.acting = str(engine.get("acting") or (known.role if known.role != ADAPTIVE else "colocated"))
            known.state = str(engine.get("state", EngineState.HEALTHY))
            known.healthy = known.state == EngineState.HEALTHY
            fresh[name] = known
        gone = [engine for name, engine in self._engines.items() if name not in fresh]
        self._engines = fresh
        self._by_role, self._healthy_by_role = {}, {}
        for engine in fresh.values():
            self._by_role.setdefault(engine.acting, []).append(engine)
            if engine.healthy:
                self._healthy_by_role.setdefault(engine.acting, []).append(engine)
        self._unhealthy_roles = {engine.acting for engine in fresh.values() if engine.state == EngineState.UNHEALTHY}
        self.adaptive = any(engine.role == ADAPTIVE for engine in fresh.values())
        if version is not None:
            self.version = version
        self._publish_counts(gone)
        self.publish_health()

    def _publish_counts(self, gone: Iterable[EngineLoad]) -> None:
        """Engines per role; an engine removed (scale-in) leaves no gauge of its own behind."""
        if self._metrics is None:
            return
        for engine in gone:
            self._in_flight.pop((engine.name, engine.role), None)
            for gauge in (self._metrics.healthy, self._metrics.in_flight):
                try:
                    gauge.remove(engine.name, engine.role)
                except KeyError:  # never set
                    pass
        counts = Counter(engine.role for engine in self._engines.values())
        self._roles_seen.update(counts)
        for role in self._roles_seen:
            self._metrics.engines.labels(role).set(counts.get(role, 0))
        for engine in gone:
            for acting in ACTING_ROLES:
                try:
                    self._metrics.acting.remove(engine.name, acting)
                except KeyError:
                    pass
        for engine in self._engines.values():
            if engine.role == ADAPTIVE:
                for acting in ACTING_ROLES:
                    self._metrics.acting.labels(engine.name, acting).set(1 if engine.acting == acting else 0)

    def publish_health(self) -> None:
        """Set each engine's health gauge to what routing uses now."""
        if self._metrics is not None:
            for engine in self._engines.values():
                self._metrics.healthy.labels(engine.name, engine.role).set(1 if self._usable(engine) else 0)

    def _usable(self, engine: EngineLoad) -> bool:
        return engine.healthy and time.monotonic() >= self._suspect_until.get(engine.name, 0.0)

    def _of_role(self, role: str) -> list[EngineLoad]:
        return self._by_role.get(role, [])

    def _suspects(self) -> bool:
        """Whether an engine is still suspect (its entry dropped once its time is up)."""
        if self._suspect_until:
            now = time.monotonic()
            self._suspect_until = {name: until for name, until in self._suspect_until.items() if until > now}
        return bool(self._suspect_until)

    def _usable_of(self, role: str) -> list[EngineLoad]:
        """The engines of ``role`` that routing uses now (the kept list itself: not to be changed)."""
        healthy = self._healthy_by_role.get(role, [])
        return [engine for engine in healthy if self._usable(engine)] if self._suspects() else healthy

    def healthy(self, role: str) -> list[EngineLoad]:
        return list(self._usable_of(role))

    @property
    def disaggregated(self) -> bool:
        """Whether the deployment has prefill and decode instances (whatever their health)."""
        return bool(self._by_role.get("prefill") and self._by_role.get("decode"))

    @property
    def ready(self) -> bool:
        """A request can be served: by any healthy engine (a decode computes the prompt
        itself when no prefill answers; a prefill serves whole requests when no decode is
        healthy; a colocated engine does both)."""
        return any(self._usable(engine) for engine in self._engines.values())

    def admission_slots(self, per_engine: int) -> int:
        """Requests the door admits at once: ``per_engine`` per healthy engine that serves
        answers (decode engines, prefill ones while no decode is healthy, or colocated
        ones); in a split adaptive pool besides, ``PREFILL_SLOTS`` per prefill engine (a
        prompt computing and one waiting keep it busy; more would wait there while the
        decode engines take more streams than their level allows: on the ramp, admitting
        ``per_engine`` per engine whatever its role put 60 streams on each of 6 decode
        engines at 1.5x load, and no answer met the inter-token level)."""
        if self.adaptive:
            prefill = len(self._usable_of("prefill"))
            answering = len(self._usable_of("decode")) + len(self._usable_of("colocated"))
            return answering * per_engine + prefill * PREFILL_SLOTS if answering else prefill * per_engine
        if not self.disaggregated:
            return len(self.healthy("colocated")) * per_engine
        return (len(self.healthy("decode")) or len(self.healthy("prefill"))) * per_engine

    def order(self, role: str, affinity_key: bytes, ranker: Ranker | None = None) -> list[EngineLoad]:
        """Engines of ``role`` to try, best first for this request: the healthy ones in the
        policy's order (or ``ranker``'s, which knows the request's KV), then, as a last
        resort, those that are running but in doubt (missed health probes, or failed a
        request lately): on a machine too busy to answer probes in time, a slow answer is
        better than a 503."""
        policy = self._decode_policy if role == "decode" else self.policy
        if role not in self._unhealthy_roles and not self._suspects():  # the common case: nobody in doubt
            healthy = self._healthy_by_role.get(role, [])
            return ranker(healthy) if ranker is not None else policy.order(healthy, affinity_key)
        healthy, doubtful = [], []
        for engine in self._of_role(role):
            if self._usable(engine):
                healthy.append(engine)
            elif engine.state in (EngineState.HEALTHY, EngineState.UNHEALTHY):  # running: suspect, or missed probes
                # (a draining engine, being scaled in, gets nothing new; nor a restarting or failed one)
                doubtful.append(engine)
        ranked = ranker(healthy) if ranker is not None else policy.order(healthy, affinity_key)
        return ranked + sorted(doubtful, key=lambda engine: engine.outstanding)

    def mark_failed(self, engine: EngineLoad) -> None:
        self._suspect_until[engine.name] = time.monotonic() + SUSPECT_S
        if self._metrics is not None:
            self._metrics.healthy.labels(engine.name, engine.role).set(0)

    def acquire(self, engine: EngineLoad) -> None:
        """Count one more request in flight on ``engine``; ``release`` when it is answered."""
        engine.outstanding += 1
        if self._metrics is not None:
            self._in_flight_gauge(engine).inc()

    def release(self, engine: EngineLoad) -> None:
        engine.outstanding -= 1
        if self._metrics is not None and self._engines.get(engine.name) is engine:  # a removed engine has no gauge
            self._in_flight_gauge(engine).dec()

    def _in_flight_gauge(self, engine: EngineLoad) -> Any:
        key = (engine.name, engine.role)
        gauge = self._in_flight.get(key)
        if gauge is None:
            assert self._metrics is not None
            gauge = self._in_flight[key] = self._metrics.in_flight.labels(*key)
        return gauge

    @contextmanager
    def track(self, engine: EngineLoad) -> Iterator[None]:
        """Count a request in flight on ``engine`` while the block runs."""
        self.acquire(engine)
        try:
            yield
        finally:
            self.release(engine)

    def all_engines(self) -> list[EngineLoad]:
        return list(self._engines.values())
