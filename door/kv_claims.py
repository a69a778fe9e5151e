"""Provisional holdings: the blocks of prompts the door routed, counted as held by the
engine computing them until that engine's KV events confirm them (door/kv_index.py).

An engine's events come only after its scheduler step computed the blocks (hundreds of
ms for a long prompt on CPU); until then, requests sharing the prompt's head would see
nothing cached and be spread over engines that each compute it. So the door, when it
sends a prompt to the engine that will compute it, records that engine as holding the
prompt's full blocks in its device cache: its bit is set in the device medium's holders,
where ``KVIndex.match`` counts it as any device hit (no cost added to the walk), and the
engine's ``provisional`` dict names the chained hashes held that way (chained hash -> the
``Hold`` that last claimed it). A block the engine holds by its events is not claimed
(real and provisional are exclusive per engine and block). What ends a claim:
- the engine's own ``BlockStored`` for the block (device medium): confirmed, from then
  on an ordinary entry (removals, the cap, drops);
- ``provisional_ttl_s`` passing (the request failed, was aborted, or the engine's blocks
  never come under the door's chained hashes): gone, checked lazily by ``KVIndex.match`` (one
  clock call when claims are live) and by ``expire`` (the door's once-a-second publish);
  a later request routed to the engine for the same block claims it again, anew;
- ``drop``/``remove`` of the engine (``AllBlocksCleared``, lost events, a restart);
- the cap: at most ``max_provisional`` claims (a block claimed again counts again until
  its earlier claim ends), the oldest ended first.
Claims are kept per routed prompt (``Hold``, in a queue in deadline order: the TTL is one
setting and the clock monotonic), so expiring is a pop from the queue's front. Measured
(``benchmarks.kv_index_scale --in-flight 256``, 2-core box at load 2.8): ~120 bytes per
claim (the default cap, ~30 MiB); ``hold`` of a new 2048-token prompt 34 us p50 (two
dict writes per block); a decision 5 us slower at p50 with 160K claims live (a larger
holders dict, and holds between decisions evicting the caches).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from common.kv_wire import MEDIUM_GPU
from door.kv_holders import unset_holder


class Claimant(Protocol):
    """An engine of the index: its bit in the holders' masks, and its claimed blocks
    (device chained hash -> the ``Hold`` that last claimed it)."""

    bit: int
    provisional: dict[int, Hold]


class Hold:
    """The blocks of one prompt that the door routed to ``engine`` and claimed for it
    (chained hashes) until ``deadline``; a block claimed again later belongs to the later
    claim (``engine.provisional`` names the owner)."""

    __slots__ = ("deadline", "engine", "chains")

    def __init__(self, deadline: float, engine: Claimant, chains: list[int]) -> None:
        self.deadline = deadline
        self.engine = engine
        self.chains = chains


class Claims:
    """The index's provisional claims. ``holders``: the index's medium -> chained hash ->
    engine bitmask (claims set and unset bits in the device medium's). ``live``: claimed
    blocks not yet confirmed or ended; ``confirmed``/``expired``: claims that ended so."""

    def __init__(self, holders: dict[str, dict[int, int]], ttl_s: float, max_claims: int,
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.holders = holders
        self.ttl_s = ttl_s
        self.max_claims = max_claims
        self.clock = clock
        self.queue: deque[Hold] = deque()  # oldest (earliest deadline) first
        self.claimed = 0  # chains over the queued holds (the cap's count)
        self.live = 0  # entries of the engines' provisional dicts
        self.confirmed = 0
        self.expired = 0

    def hold(self, engine: Claimant, hashes: Sequence[int]) -> int:
        """Claim the prompt's blocks (``hashes``) for ``engine``, which will compute them;
        returns how many it claimed (not those it holds by its events; those it held
        provisionally are claimed anew, until a new deadline)."""
        if not hashes or not self.max_claims:
            return 0
        provisional, bit = engine.provisional, engine.bit
        holders = self.holders.setdefault(MEDIUM_GPU, {})
        get = holders.get
        chains: list[int] = []  # the blocks claimed: not held, or held provisionally (claimed anew)
        unheld = 0
        for chain in hashes:
            mask = get(chain, 0)
            if not mask & bit:
                holders[chain] = mask | bit
                unheld += 1
            elif chain not in provisional:
                continue  # held by its events
            chains.append(chain)
        if not chains:
            return 0
        claim = Hold(self.clock() + self.ttl_s, engine, chains)
        provisional.update(dict.fromkeys(chains, claim))
        self.live += unheld
        self.queue.append(claim)
        self.claimed += len(chains)
        while self.claimed > self.max_claims:
            self.expired += self._end(self.queue.popleft())
        return len(chains)

    def expire(self) -> int:
        """End the claims whose time-to-live has passed; returns how many blocks."""
        now = self.clock()
        queue = self.queue
        ended = 0
        while queue and queue[0].deadline <= now:
            ended += self._end(queue.popleft())
        self.expired += ended
        return ended

    def confirm(self, provisional: dict[int, Hold], chain: int) -> None:
        """The engine's own event stored a block it held provisionally: an ordinary entry now
        (its bit stays)."""
        del provisional[chain]
        self.live -= 1
        self.confirmed += 1

    def unclaim_all(self, engine: Claimant) -> int:
        """End all of ``engine``'s claims (their queued ``Hold``s end nothing when their turn
        comes); returns how many blocks."""
        provisional = engine.provisional
        holders = self.holders.get(MEDIUM_GPU, {})
        for chain in provisional:
            unset_holder(holders, chain, engine.bit)
        count = len(provisional)
        provisional.clear()
        self.live -= count
        return count

    def _end(self, claim: Hold) -> int:
        """End those of a dequeued claim's blocks it still holds (not confirmed, dropped or
        claimed again since); returns how many."""
        self.claimed -= len(claim.chains)
        provisional, bit = claim.engine.provisional, claim.engine.bit
        holders = self.holders[MEDIUM_GPU]
        ended = 0
        for chain in claim.chains:
            if provisional.get(chain) is claim:
                del provisional[chain]
                unset_holder(holders, chain, bit)
                ended += 1
        self.live -= ended
        return ended
