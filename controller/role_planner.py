"""The role planner (ROLES=adaptive): from the service levels the door observed, which
role each engine acts in: all colocated (every engine serves whole requests), or split
into prefill and decode engines (the door sends each request's prefill leg to one and its
decode leg to another). Pure: the Controller feeds it the door's windows and applies what
it returns (controller/controller.py); tests feed it recorded series.

First, at once (no window, no settling): when the arriving requests ask for another
workload than the layout was set or judged on (``arriving_tokens``), the layout that
served that workload best within ``recall_s`` on as many engines, if one did; either
way, windows are judged again only after ``settle_s`` (they hold the workload before).

A window in which the door held no request for over ``IDLE_SHARE`` of it (the client
paused: a benchmark between its runs) says how much came, not what the layout serves:
it is not remembered, and one that missed a level decides nothing.

The rules, judged on a window that began after the last change (the rules below that
move roles, on the layout's second window: its first holds the change's own transition,
a prefill engine's prefix cache filling with the groups the other engines held):
- a planner that scales, on a split pool with a role short of what the measured work
  needs for the load coming (controller/role_sizing.py), levels met or not, or on an
  all-colocated pool missing the inter-token level: the roles moved and engines added
  toward it;
- both levels met: nothing changes, but a split pool tries all colocated once per
  workload (below) if that was not seen on it and 99% of its answers met both;
- inter-token latency missed (prefills stall the decodes sharing their engine) on an
  all-colocated pool: split by the measured work (``split_prefill``): prefill engines
  enough for the answers a second, each prompt holding one about the median TTFT, the
  rest decode;
- TTFT missed on a split pool whose prefill engines have under half a request in flight
  each (answers wait for decode slots, not prompts for prefill): more decode engines, in
  proportion as below (``over`` taken at most 2); engines added then decode too;
- TTFT missed on a split pool (prompts queue): more prefill engines, the idlest decode
  ones, ``ceil(prefill x (over - 1))`` of them (``over``: the p90 against its level, at
  most 3; one decode engine stays), or with a single decode engine left, back to all
  colocated;
- inter-token latency missed on a split pool with several prefill engines: more decode
  engines, in the same proportion;
- the worse of the two (measured against its level) decides when both are missed; where
  engines may be added, a split pool whose other level is over ``GIVE`` of its own too
  moves nothing (neither role has engines to spare) and grows at once (no going back);
  a planner that scales moves at most the engines the giving role's level spares.
Layouts are compared by goodput, the answers a second that met both levels over the
time the door held requests (under a closed-loop load a layout that serves faster gets
more answers, so a share would mislead; equal goodput, e.g. none met: by answers a
second), and only under the same workload (mean output tokens within ``SAME_WORKLOAD`` x): a layout
seen within ``memory_s`` doing no better than now is not gone to (no flapping between two
layouts that both miss), and when the rules above find no move, the layout before the
last change is gone back to if it did better than now. When no change helps, the planner
adds engines (``scale``: ``ceil(n x (over - 1))``, at least 1, at most ``n`` and up to
``max_engines``; 0: it never scales), new ones taking the role that is short
(``new_role``), or says, once per ``settle_s``, that more engines are needed. With both
levels met with room (each p90 at most half its level, 99% of answers meeting both) for
``QUIET_WINDOWS`` windows in a row, it removes one (the highest-numbered, as the scale
path does; down to ``min_engines``), unless the smaller layout was seen doing worse
within ``memory_s``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from common.config import SloConfig
from common.scale_port import MAX_SCALE_STEP
from common.service_levels import ServiceLevels, same_workload
from controller.role_layouts import (
    Layout,
    after_removal,
    describe_layout,
    highest_numbered,
    layout_of,
    least_busy,
    roles_of,
    spared,
)
from controller.role_sizing import PREFILL_BUSY, RoleSizing, fit

ROOM = 0.5  # both p90s at most this share of their levels: an engine may go
ROOM_ATTAINMENT = 0.99
GIVE = 0.8  # a role gives engines to the other only with its own level this far under (when engines may be added)
RISING = 1.1  # arrivals this many times the window before's: a rising load
IDLE_SHARE = 0.5  # the door held no request over this share of a window: the client paused
QUIET_WINDOWS = 3  # windows in a row with room before an engine goes
HISTORY_KEPT = 512  # judged windows remembered (layout, how it served)


@dataclass(frozen=True)
class Seen:
    """A layout's window, as remembered to compare layouts."""

    goodput: float  # answers a second that met both levels
    answers: float  # answers a second (ties in goodput, e.g. none met: the one that served more did better)
    at: float  # when it was judged
    output_tokens: float  # the workload: mean tokens out
    arriving_tokens: float = 0.0  # the workload as its requests asked: median max tokens of the latest; 0: unknown

    @property
    def served(self) -> tuple[float, float]:
        return self.goodput, self.answers


def _served(levels: ServiceLevels) -> tuple[float, float]:
    """Answers a second that met both levels, and all, over the time the door held requests."""
    busy_s = max(levels.window_s - levels.idle_s, 1e-3)
    return levels.met / busy_s, levels.requests / busy_s


@dataclass(frozen=True)
class RoleDecision:
    """What the planner decided and why; ``moved`` empty: advice only (no change helps)."""

    at: float  # the time it was decided (the caller's clock)
    roles: dict[str, str]  # every adaptive engine's acting role after it
    reason: str
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # engine -> (from, to)
    scale: int = 0  # engines to add (+1) or remove (-1) through the scale path; 0: none
    attainment: float = 1.0  # of the window it was decided on
    ttft_p90_ms: float = 0.0
    itl_p90_ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class RolePlanner:
    def __init__(self, slo: SloConfig, min_requests: int = 10, settle_s: float = 30.0, memory_s: float = 300.0,
                 min_engines: int = 2, max_engines: int = 0, recall_s: float = 1800.0,
                 streams_prior: int = 0) -> None:  # fmt: skip
        self.slo = slo
        self.min_engines = min_engines
        self.max_engines = max_engines  # 0: the planner never scales
        self.min_requests = min_requests  # a window with fewer answers decides nothing
        self.settle_s = settle_s  # after a change, the layout serves this long (and a whole window) before it is judged
        self.memory_s = memory_s  # how long a layout's goodput is remembered
        self.recall_s = recall_s  # how long the layout that served a workload best is gone back to when it returns
        self._changed_at = -math.inf
        self._advised_at = -math.inf
        self._history: deque[tuple[Layout, Seen]] = deque(maxlen=HISTORY_KEPT)  # judged windows, oldest first
        self._serving = 0.0  # the workload (tokens asked for) the current layout was set or judged on
        self._before: dict[str, str] | None = None  # the roles before the planner's last change
        self._quiet_since: float | None = None  # since when every window had room
        self._roles_since = -math.inf  # when the roles last moved (the planner, an operator, engines added or removed)
        self.new_role = "colocated"  # the role engines added by the planner's last scale-out take
        # what each role needs for the load coming (a planner that scales); ``streams_prior``: the streams a
        # decode engine is taken to hold until a split window measured it
        self._sizing = RoleSizing(slo, settle_s, streams_prior)

    def changed(self, now: float) -> None:
        """Roles changed from outside (an operator, new engines): judge afresh after ``settle_s``."""
        self._changed_at, self._roles_since, self._quiet_since = now, now, None

    def decide(self, levels: ServiceLevels, roles: Mapping[str, str], now: float) -> RoleDecision | None:
        """The decision for this window, or None (keep the roles as they are)."""
        decision = self._decide(levels, roles, now)
        if decision is not None and decision.moved:
            self._roles_since = now
        return decision

    def _decide(self, levels: ServiceLevels, roles: Mapping[str, str], now: float) -> RoleDecision | None:
        if len(roles) < 2:
            return None
        returned = self._workload_returned(levels, roles, now)
        if returned is not None or levels.requests < self.min_requests:
            return returned
        if now - self._changed_at < max(self.settle_s, levels.window_s):
            return None  # the window still holds answers of the layout before
        current = layout_of(roles)
        ttft_over = levels.ttft_p90_ms / self.slo.ttft_ms
        itl_over = levels.itl_p90_ms / self.slo.itl_ms
        paused, served = levels.idle_s > IDLE_SHARE * levels.window_s, _served(levels)
        if paused and max(ttft_over, itl_over) > 1:
            return None  # a miss in a window the client paused in is judged once requests come steadily
        if not paused:
            # a window whose answers are another workload than the requests arriving (a change under way) is
            # remembered for comparisons, not for a workload's return
            arriving = levels.arriving_tokens if same_workload(levels.arriving_tokens, levels.output_tokens) else 0.0
            self._history.append((current, Seen(*served, now, levels.output_tokens, arriving)))
        self._serving = levels.arriving_tokens or self._serving
        idle = f" (the door idle {levels.idle_s:.0f} s of it)" if levels.idle_s >= 0.5 else ""
        summary = (f"TTFT p90 {levels.ttft_p90_ms:.0f} ms (SLO {self.slo.ttft_ms:g}), inter-token p90 "
                   f"{levels.itl_p90_ms:.0f} ms (SLO {self.slo.itl_ms:g}), {levels.met} of {levels.requests} answers "
                   f"in {levels.window_s:g} s{idle} met both ({levels.attainment:.0%}, {served[0]:.2f}/s) on "
                   f"{describe_layout(current)}")  # fmt: skip
        self._sizing.learn(levels, roles)
        sized = self._sized(dict(roles), levels, now, summary)
        if sized is not None:
            return sized
        if ttft_over <= 1 and itl_over <= 1:
            probe = self._probe_colocated(dict(roles), levels, now, summary)
            return probe or self._scale_in(dict(roles), levels, now, summary, max(ttft_over, itl_over))
        self._quiet_since = None
        short = "prefill" if ttft_over >= itl_over and not _prefill_idle(roles, levels) else "decode"
        if self.max_engines and len(roles) < self.max_engines and set(roles.values()) != {"colocated"} \
                and min(ttft_over, itl_over) > GIVE:  # fmt: skip
            return self._scale_out(dict(roles), levels, now, summary, "neither role has engines to spare",
                                   max(ttft_over, itl_over), short)  # fmt: skip
        target, why = _target(dict(roles), ttft_over, itl_over, levels, bounded=bool(self.max_engines))
        if target is not None:
            worse = self._worse_before(layout_of(target), levels, now)
            if worse:
                why, target = worse, None
        if target is None and self._before is not None and set(self._before) == set(roles):
            seen = self._recall(layout_of(self._before), levels, now)
            if seen is not None and seen.served > _served(levels):
                target = self._before
                why = (f"{why}; back to {describe_layout(layout_of(target))}: it met both levels at {seen.goodput:.2f} "
                       f"answers/s {now - seen.at:.0f} s ago")  # fmt: skip
        if target is None:
            return self._scale_out(dict(roles), levels, now, summary, why, max(ttft_over, itl_over), short)
        if now - self._roles_since < max(self.settle_s, levels.window_s) + levels.window_s:
            return None  # a layout's first window holds its change's own transition: roles move on its second
        self._changed_at, self._before = now, dict(roles)
        moved = {name: (roles[name], role) for name, role in target.items() if roles[name] != role}
        return self._decision(now, target, f"{summary}; {why}", levels, moved)

    def _sized(self, roles: dict[str, str], levels: ServiceLevels, now: float, summary: str) -> RoleDecision | None:
        """A planner that scales, on a split pool with a role short of what the measured work
        needs for the load coming (controller/role_sizing.py), met levels or not, or on an
        all-colocated pool missing the inter-token level (or past ``GIVE`` of it with the
        arrivals rising): the roles moved and engines added toward it (the new ones take
        the role further short)."""
        prefill, decode, colocated = layout_of(roles)
        rising = levels.arrival_rps > RISING * levels.arrival_rps_before
        if not self.max_engines or (colocated and levels.itl_p90_ms <= self.slo.itl_ms * (GIVE if rising else 1.0)):
            return None  # (colocated engines near their inter-token level under a rising load split before they miss it)
        if colocated:  # a split takes its prefill engines from engines that all decode now
            prefill, decode = 0, colocated
        need = self._sizing.need(levels)
        if need is None or (not colocated and need.prefill <= prefill and need.decode <= decode):
            return None
        engines = len(roles)
        count = max(0, min(MAX_SCALE_STEP, self.max_engines - engines, need.prefill + need.decode - engines))
        want_prefill, want_decode = fit(need, prefill, decode, engines + count)  # the pool once this step is done
        new_role = "prefill" if want_prefill - prefill >= want_decode - decode else "decode"
        now_prefill = want_prefill - count if new_role == "prefill" else want_prefill
        now_prefill = min(engines - 1, max(1, now_prefill))
        if not count and abs(now_prefill - prefill) <= 1:
            return None  # at the limit one engine either way is within the measures' noise
        target = roles_of((now_prefill, engines - now_prefill, 0), roles, levels)
        if not count and self._worse_before(layout_of(target), levels, now):
            return None  # at the limit the measures can be off; a layout seen doing no better is not gone back to
        moved = {name: (roles[name], role) for name, role in target.items() if roles[name] != role}
        self._changed_at, self._quiet_since = now, None
        if moved:
            self._before = dict(roles)
        if count:
            self.new_role = new_role
        adding = (f", adding {count} {new_role} engine(s) ({engines} -> {engines + count}, at most "
                  f"{self.max_engines})" if count else "")  # fmt: skip
        return self._decision(now, target, f"{summary}; {need.describe()}: {describe_layout(layout_of(target))}{adding}",
                              levels, moved, scale=count)  # fmt: skip

    def _probe_colocated(self, roles: dict[str, str], levels: ServiceLevels, now: float,
                         summary: str) -> RoleDecision | None:  # fmt: skip
        """A split pool meeting both levels (99% of its answers) tries all colocated once per workload: a
        layout that meets the levels may still serve fewer answers (under a closed-loop
        load), and only a window of the other says so; the goodput comparison returns."""
        colocated = (0, 0, len(roles))
        if layout_of(roles) == colocated or self._recall(colocated, levels, now) is not None \
                or levels.attainment < ROOM_ATTAINMENT:  # fmt: skip
            return None  # (at the edge of the levels, e.g. an open-loop load near capacity, a probe costs a window)
        need = self._sizing.need(levels) if self.max_engines else None
        if need is not None and need.prefill + need.decode > len(roles) / 2:
            return None  # the split is busy: colocated engines would stall (on the ramp at its capacity, 52% met)
        target = dict.fromkeys(roles, "colocated")
        self._changed_at, self._before, self._quiet_since = now, dict(roles), None
        moved = {name: (role, "colocated") for name, role in roles.items()}
        return self._decision(now, target, f"{summary}; trying all colocated: not seen on this workload "
                              f"(about {levels.output_tokens:.0f} tokens out) for {self.memory_s:g} s", levels, moved)  # fmt: skip

    def _workload_returned(self, levels: ServiceLevels, roles: Mapping[str, str], now: float) -> RoleDecision | None:
        """The requests arriving now ask for another workload than the layout was set or
        judged on (their output tokens, ``arriving_tokens``): go at once, without waiting for
        answers or settling, to the layout that served that workload best within
        ``recall_s`` on as many engines. A workload's phases can be shorter than the windows
        that would find the layout again."""
        arriving = levels.arriving_tokens
        if arriving <= 0 or self._serving <= 0 or same_workload(arriving, self._serving):
            return None
        # the windows now hold the workload before: judged again only after settling
        was, self._serving, self._changed_at = self._serving, arriving, now
        best: dict[Layout, Seen] = {}  # each layout's latest window on the arriving workload
        for layout, seen in self._history:
            if now - seen.at <= self.recall_s and seen.arriving_tokens > 0 and sum(layout) == len(roles) \
                    and same_workload(seen.arriving_tokens, arriving):  # fmt: skip
                best[layout] = seen
        if not best:
            return None
        layout, seen = max(best.items(), key=lambda item: item[1].served)
        if layout == layout_of(roles):
            return None
        target = roles_of(layout, roles, levels)
        self._changed_at, self._before, self._quiet_since = now, dict(roles), None
        moved = {name: (roles[name], role) for name, role in target.items() if roles[name] != role}
        return self._decision(now, target, f"the arriving requests ask for about {arriving:.0f} tokens out, "
                              f"not {was:.0f}: back to {describe_layout(layout)}, which served that workload best "
                              f"({seen.goodput:.2f} answers/s met both levels {now - seen.at:.0f} s ago)", levels, moved)  # fmt: skip

    def _recall(self, layout: Layout, levels: ServiceLevels, now: float) -> Seen | None:
        """``layout``'s goodput (and when it was judged) if seen within ``memory_s`` under the
        same workload as now (a layout's goodput on other requests says nothing)."""
        for seen_layout, seen in reversed(self._history):
            if now - seen.at > self.memory_s:
                return None
            if seen_layout == layout and same_workload(seen.output_tokens, levels.output_tokens):
                return seen
        return None

    def _worse_before(self, layout: Layout, levels: ServiceLevels, now: float) -> str:
        """Why ``layout`` is not to be gone to ("" if it may be): seen lately doing no better."""
        seen = self._recall(layout, levels, now)
        if seen is not None and seen.served <= _served(levels):
            return (f"{describe_layout(layout)} met both levels at {seen.goodput:.2f} answers/s {now - seen.at:.0f} s ago, "
                    "no better")  # fmt: skip
        return ""

    def _scale_out(self, roles: dict[str, str], levels: ServiceLevels, now: float, summary: str, why: str,
                   over: float, short: str) -> RoleDecision | None:  # fmt: skip
        """Add engines in proportion to how far the worse level is over (``short``: the
        role that is short in a split pool; an all-colocated pool adds colocated ones)."""
        if self.max_engines and len(roles) < self.max_engines:
            count = min(self.max_engines - len(roles), MAX_SCALE_STEP, _step(len(roles), min(over, 2.0)))
            self.new_role = "colocated" if set(roles.values()) == {"colocated"} else short
            self._changed_at = now
            return self._decision(now, roles, f"{summary}; no role change helps ({why}): adding {count} "
                                  f"{self.new_role} engine(s) ({len(roles)} -> {len(roles) + count}, at most "
                                  f"{self.max_engines})", levels, scale=count)  # fmt: skip
        if now - self._advised_at < self.settle_s:
            return None
        self._advised_at = now
        return self._decision(now, roles, f"{summary}; no role change helps ({why}): more engines needed", levels)

    def _scale_in(self, roles: dict[str, str], levels: ServiceLevels, now: float, summary: str,
                  worst_over: float) -> RoleDecision | None:  # fmt: skip
        """Both levels met with room (each p90 at most ``ROOM`` of its level; or, when the
        sizing needs fewer engines than the pool has, at most ``GIVE``) for ``QUIET_WINDOWS``
        windows: the highest-numbered engine goes (the scale path's order), first swapping
        roles with another engine when its own role cannot spare it."""
        if not self.max_engines or len(roles) <= self.min_engines:
            return None
        need = self._sizing.need(levels)
        spare = need is not None and need.prefill + need.decode < len(roles)
        if levels.attainment < ROOM_ATTAINMENT or worst_over > (GIVE if spare else ROOM) or (need and not spare):
            self._quiet_since = None
            return None
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since < QUIET_WINDOWS * levels.window_s:
            return None  # room for one window is not yet a trend
        name = highest_numbered(list(roles))
        target = spared(roles, name, need, levels) if need is not None else dict(roles)
        if target is None or self._worse_before(layout_of(after_removal(target, name)), levels, now):
            return None
        self._changed_at, self._quiet_since = now, None
        moved = {engine: (roles[engine], role) for engine, role in target.items() if roles[engine] != role}
        why = f"the measured work needs {need.prefill}P+{need.decode}D" if spare else "both levels met with room"  # type: ignore[union-attr]
        return self._decision(now, target, f"{summary}; {why} for {QUIET_WINDOWS} windows: removing an engine "
                              f"({len(roles)} -> {len(roles) - 1}, at least {self.min_engines})", levels, moved, scale=-1)  # fmt: skip

    @staticmethod
    def _decision(now: float, roles: dict[str, str], reason: str, levels: ServiceLevels,
                  moved: dict[str, tuple[str, str]] | None = None, scale: int = 0) -> RoleDecision:  # fmt: skip
        return RoleDecision(at=now, roles=roles, reason=reason, moved=moved or {}, scale=scale,
                            attainment=levels.attainment, ttft_p90_ms=levels.ttft_p90_ms,
                            itl_p90_ms=levels.itl_p90_ms)  # fmt: skip


def _target(roles: dict[str, str], ttft_over: float, itl_over: float, levels: ServiceLevels,
            bounded: bool = False) -> tuple[dict[str, str] | None, str]:  # fmt: skip
    """The roles to move to and why; (None, why not) when no role change helps. The
    worse level (against its own) decides; a split pool moves engines in proportion to
    how far it is over: ``ceil(n x (over - 1))`` of the ``n`` engines of the short role,
    ``over`` taken at most 3 (so one prefill engine becomes 2, 3, then 3x as many).
    ``bounded`` (a planner that scales): the other role gives at most the share of its
    engines its own level has to spare, ``floor(m x (1 - its over))`` of its ``m``; none
    spare: engines are added instead, if the limit allows (on the ramp, 15P+8D with
    inter-token latency at 75% of its level gave 7 decode engines to prefill, and the one
    left missed it 2x)."""
    ttft_worse = ttft_over > 1 and ttft_over >= itl_over
    prefill, decode, colocated = layout_of(roles)
    if colocated and not (prefill or decode):
        if ttft_worse:
            return None, "all engines compute prompts already"
        prefill_count = split_prefill(len(roles), levels)
        first = least_busy(roles, "colocated", levels, prefill_count)
        split = {name: "prefill" if name in first else "decode" for name in roles}
        return split, (f"splitting {prefill_count}P+{len(roles) - prefill_count}D by the measured work: "
                       f"{', '.join(first)} compute prompts, the others decode undisturbed")  # fmt: skip
    roles = {name: "decode" if role == "colocated" else role for name, role in roles.items()}
    decode += colocated
    if ttft_worse:
        if prefill >= 2 and _prefill_idle(roles, levels):
            names = least_busy(roles, "prefill", levels, min(prefill - 1, _step(decode, min(ttft_over, 2.0))))
            return {**roles, **dict.fromkeys(names, "decode")}, (f"{', '.join(names)} prefill -> decode: prompts do "
                    "not queue at the prefill engines (under half a request each), answers wait for decode slots")  # fmt: skip
        if decode >= 2:
            count = min(decode - 1, _step(prefill, ttft_over), _spare(decode, itl_over) if bounded else decode)
            if count <= 0:
                return None, f"prompts queue, and the decode engines have none to spare (inter-token p90 at {itl_over:.0%})"
            names = least_busy(roles, "decode", levels, count)
            return {**roles, **dict.fromkeys(names, "prefill")}, f"{', '.join(names)} decode -> prefill: prompts queue"
        return {name: "colocated" for name in roles}, "all colocated: prompts queue and one decode engine is left"
    if prefill >= 2:
        count = min(prefill - 1, _step(decode, itl_over), _spare(prefill, ttft_over) if bounded else prefill)
        if count <= 0:
            return None, f"decodes are too many, and the prefill engines have none to spare (TTFT p90 at {ttft_over:.0%})"
        names = least_busy(roles, "prefill", levels, count)
        return {**roles, **dict.fromkeys(names, "decode")}, f"{', '.join(names)} prefill -> decode: decodes are too many for their engines"
    return None, "one prefill engine is the least a split pool has"


def _spare(engines: int, over: float) -> int:
    """Engines of a role that its level's room allows to go: ``floor(engines x (1 - over))``."""
    return max(0, math.floor(engines * (1.0 - over)))


def split_prefill(engines: int, levels: ServiceLevels) -> int:
    """How many of ``engines`` to compute prompts when a colocated pool splits: enough for
    the answers a second of the window, each prompt holding an engine about the window's
    median TTFT, at ``PREFILL_BUSY`` of their time; the rest decode. At least 1 and at
    most ``engines - 1``; 1 when nothing was measured. (A planner that scales splits by
    the sizing instead: ``RolePlanner._sized``.)"""
    rate = levels.requests / levels.window_s if levels.window_s > 0 else 0.0
    prompt_s = levels.ttft_p50_ms / 1000.0
    if rate <= 0 or prompt_s <= 0:
        return 1
    return min(engines - 1, max(1, math.ceil(rate * prompt_s / PREFILL_BUSY)))


def _step(engines: int, over: float) -> int:
    return max(1, math.ceil(engines * (min(over, 3.0) - 1)))


def _prefill_idle(roles: Mapping[str, str], levels: ServiceLevels) -> bool:
    """A split pool's prefill engines hold under half a request each (measured): prompts do
    not queue there; a missed TTFT is answers waiting for decode slots (in the decode
    engines' own queues). Half: while every prefill engine holds
    one, the door lends whole requests to idle decode engines, so a busy prefill side
    reads about one each."""
    engines = [name for name, acting in roles.items() if acting == "prefill"]
    return bool(engines and levels.in_flight) and sum(levels.in_flight.get(name, 0) for name in engines) < len(engines) / 2
