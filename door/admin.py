"""The door's admin endpoints (behind the API key when one is set, like every path but /health):

- ``GET /admin/engines``: the routing table: each engine's name, role, url, state,
  requests in flight and restarts, with the table's version.
- ``POST /admin/scale`` ``{"role": "decode", "delta": 1}``: add (delta > 0) or drain and
  remove (delta < 0) instances of a role (controller/scaling.py); answers when done with
  the engines added or removed and the seconds it took. 400: refused, nothing changed;
  409: another scale operation is under way; 500: new engines failed to start (stopped
  again); 501: this door has no scaler.
- ``GET /admin/scale``: the operation under way (its phase and elapsed seconds), if any.
- ``GET /admin/roles``: ROLES=adaptive, each engine's acting role and the role planner's
  decisions; ``POST /admin/roles`` ``{"roles": {"adaptive-0": "prefill"}, "reason": "..."}``
  sets acting roles (no restart; requests in flight finish where they are), answered once
  the door routes by them. 400: refused; 501: roles are fixed in this deployment.

The Scaler blocks (actor calls, engine starts), so it runs in a thread; it sees the door
through ``LoopDoor``, which runs what it asks on the door's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from common.errors import ConfigError
from common.role_port import RoleControl
from common.scale_port import MAX_SCALE_STEP, ROLE_WORDS, ScaleBusy, ScaleControl, check_delta
from door.door_metrics import DoorMetrics
from door.engine_watch import EngineWatch
from door.routing import RoutingTable

logger = logging.getLogger(__name__)

DOOR_CALL_TIMEOUT_S = 90.0  # a refresh calls the Controller (its own bound is 60 s)

ErrorResponse = Callable[..., JSONResponse]


class LoopDoor:
    """The Scaler's view of the door (``common.scale_port.DoorView``), from its thread."""

    def __init__(self, table: RoutingTable, refresh_once: Callable[[], Awaitable[None]],
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self._table = table
        self._refresh_once = refresh_once
        self._loop = loop

    def refresh_now(self) -> None:
        asyncio.run_coroutine_threadsafe(self._refresh_once(), self._loop).result(timeout=DOOR_CALL_TIMEOUT_S)

    def engines(self) -> Mapping[str, tuple[str, int]]:
        async def read() -> dict[str, tuple[str, int]]:
            return {engine.name: (engine.state, engine.outstanding) for engine in self._table.all_engines()}

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=DOOR_CALL_TIMEOUT_S)


def add_admin_routes(
    app: FastAPI,
    table: RoutingTable,
    scaler: ScaleControl | None,
    metrics: DoorMetrics,
    refresh_once: Callable[[], Awaitable[None]],
    error: ErrorResponse,
) -> None:
    """``error``: the door's OpenAI-form error response (``openai_error``)."""

    def scale_refused() -> Response | None:
        """The answer when this door cannot scale: it has no scaler."""
        if scaler is None:
            return error(501, "scaling is not available on this door (it runs without a Controller to start engines)",
                         "not_implemented")  # fmt: skip
        return None

    @app.get("/admin/engines")
    async def engines() -> Response:
        rows = [{"name": e.name, "role": e.role, "acting": e.acting, "url": e.url, "state": e.state,
                 "in_flight": e.outstanding, "restarts": e.restarts} for e in table.all_engines()]  # fmt: skip
        return JSONResponse({"version": table.version, "engines": rows})

    @app.get("/admin/scale")
    async def scale_progress() -> Response:
        if (refused := scale_refused()) is not None:
            return refused
        assert scaler is not None
        progress = scaler.progress
        if progress is None:
            return JSONResponse({"busy": False})
        return JSONResponse({"busy": True, "operation": progress.operation, "phase": progress.phase,
                             "elapsed_s": round(time.monotonic() - progress.started, 1)})  # fmt: skip

    @app.post("/admin/scale")
    async def scale(request: Request) -> Response:
        if (refused := scale_refused()) is not None:
            return refused
        assert scaler is not None
        body = await _json_body(request, error)
        if isinstance(body, Response):
            return body
        checked = _checked_scale_request(body, error)
        if isinstance(checked, Response):
            return checked
        role, delta = checked
        door = LoopDoor(table, refresh_once, asyncio.get_running_loop())
        return await _scaled(scaler, role, delta, door, metrics, error)


def add_role_routes(app: FastAPI, table: RoutingTable, roles: RoleControl | None, watch: EngineWatch,
                    error: ErrorResponse) -> None:  # fmt: skip
    def fixed() -> Response | None:
        if roles is None or not table.adaptive:
            return error(501, "roles are fixed in this deployment; deploy with ROLES=adaptive to change them",
                         "not_implemented")  # fmt: skip
        return None

    @app.get("/admin/roles")
    async def acting_roles() -> Response:
        if (refused := fixed()) is not None:
            return refused
        return JSONResponse({"roles": {e.name: e.acting for e in table.all_engines()}, "decisions": watch.decisions})

    @app.post("/admin/roles")
    async def set_roles(request: Request) -> Response:
        if (refused := fixed()) is not None:
            return refused
        assert roles is not None
        body = await _json_body(request, error)
        if isinstance(body, Response):
            return body
        wanted = body.get("roles") if isinstance(body, dict) else None
        reason = body.get("reason", "set by an operator") if isinstance(body, dict) else ""
        if not isinstance(wanted, dict) or not wanted or not all(isinstance(v, str) for v in wanted.values()) \
                or not isinstance(reason, str):
            return error(400, 'request body must be a JSON object such as {"roles": {"adaptive-0": "prefill"}}, '
                         'with an optional "reason" string', "invalid_request_error", "roles")  # fmt: skip
        try:
            decision = await asyncio.to_thread(roles.set_roles, wanted, reason)
        except ConfigError as exc:
            return error(400, str(exc), "invalid_request_error", "roles")
        await watch.refresh_once()  # the door routes by the new roles before it answers
        watch.decisions = [*watch.decisions, decision]  # (the planner's next answer lists it too)
        return JSONResponse(decision)


async def _json_body(request: Request, error: ErrorResponse) -> Any:
    """The request's JSON body, or the 400 that says it is not JSON."""
    try:
        return await request.json()
    except ValueError as exc:
        return error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")


def _checked_scale_request(body: object, error: ErrorResponse) -> tuple[str, int] | Response:
    """The role and count of a ``POST /admin/scale`` body, or the 400 that refuses it."""
    if not isinstance(body, dict):
        return error(400, 'request body must be a JSON object such as {"role": "decode", "delta": 1}',
                     "invalid_request_error")  # fmt: skip
    role, delta = body.get("role"), body.get("delta")
    if role not in ROLE_WORDS:
        return error(400, f"'role' {role!r} is invalid: must be one of {', '.join(ROLE_WORDS)}",
                     "invalid_request_error", "role")  # fmt: skip
    if not check_delta(delta):
        return error(400, f"'delta' {delta!r} is invalid: must be a non-zero integer from -{MAX_SCALE_STEP} to "
                     f"{MAX_SCALE_STEP} (positive adds instances, negative drains and removes them)",
                     "invalid_request_error", "delta")  # fmt: skip
    assert isinstance(role, str) and isinstance(delta, int)
    return role, delta


async def _run_scale(scaler: ScaleControl, role: str, delta: int, door: LoopDoor,
                     metrics: DoorMetrics) -> tuple[str, Any]:  # fmt: skip
    """Run one scale operation (in a thread: it blocks) and count it: its outcome (done,
    busy, refused, failed) and the result, or the exception that ended it."""
    outcome: str
    try:
        answer: Any = await asyncio.to_thread(scaler.scale, role, delta, door)
        outcome = "done"
    except ScaleBusy as exc:
        outcome, answer = "busy", exc
    except ConfigError as exc:
        outcome, answer = "refused", exc
    except Exception as exc:  # an engine failed to start; an actor call failed
        outcome, answer = "failed", exc
    metrics.scale_operations.labels(role, "out" if delta > 0 else "in", outcome).inc()
    return outcome, answer


async def _scaled(scaler: ScaleControl, role: str, delta: int, door: LoopDoor, metrics: DoorMetrics,
                  error: ErrorResponse) -> Response:  # fmt: skip
    """Run one scale operation and answer with its outcome."""
    outcome, answer = await _run_scale(scaler, role, delta, door, metrics)
    if outcome == "busy":
        return error(409, str(answer), "conflict")
    if outcome == "refused":
        return error(400, str(answer), "invalid_request_error")
    if outcome == "failed":
        logger.error("[scale %s %+d] failed: %s", role, delta, answer)
        return error(500, f"scale {role} {delta:+d} failed: {answer}", "server_error")
    return JSONResponse(answer.to_dict())


async def scale_for_planner(scaler: ScaleControl, delta: int, table: RoutingTable,
                            refresh_once: Callable[[], Awaitable[None]], metrics: DoorMetrics) -> None:  # fmt: skip
    """A role planner's scale step (``scale adaptive +1`` or ``-1``), run as ``/admin/scale``
    runs one; its outcome is logged and counted, never raised."""
    door = LoopDoor(table, refresh_once, asyncio.get_running_loop())
    outcome, answer = await _run_scale(scaler, "adaptive", delta, door, metrics)
    level = {"done": logging.INFO, "busy": logging.INFO, "refused": logging.WARNING}.get(outcome, logging.ERROR)
    logger.log(level, "role planner's scale adaptive %+d %s: %s", delta, outcome,
               answer.to_dict() if outcome == "done" else answer)  # fmt: skip
