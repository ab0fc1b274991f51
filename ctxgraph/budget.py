"""Per-agent call budgets: ``max_calls_per_hour`` requests in any rolling hour on an agent's socket.

An agent VM reaches one appliance API, ctxgraph over its own channel, so that is where its manifest's
``max_api_calls_per_hour`` is enforced.  Every request that reaches ctxgraph on the agent's socket (or its vsock
CID) counts, whatever its op and whether or not it succeeds; a request refused for being over budget does not count,
so an agent that retries is not locked out for longer.  The admin socket has no budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from nullbox.wire import ErrorCode, WireError

RATE_LIMITED: Final = ErrorCode.RATE_LIMITED
"""The error code of a request over its agent's budget (the connection stays open; later requests may pass)."""

MAX_CALLS_PER_HOUR: Final = 1_000_000
WINDOW_S: Final = 3600
BUCKET_S: Final = 60
BUCKETS: Final = WINDOW_S // BUCKET_S + 1
"""61 one-minute buckets: every 60-minute interval lies within 61 consecutive whole minutes."""

Clock = Callable[[], float]


class CallBudget:
    """Counts one agent's calls in one-minute buckets over the last 61 minutes; refuses a call that would exceed
    ``limit`` (0: no limit, the calls are only counted).

    Why buckets: an exact sliding log would keep one timestamp per call (up to a million per agent), and a token
    bucket lets a full bucket plus an hour's refill through — nearly twice the budget — in one hour.  Per-minute
    buckets cost O(1) per call (an index and two additions; rolling the window forward clears at most 61 buckets)
    and 61 integers per agent, and they keep the promise exactly: any 60-minute interval lies inside the 61 whole
    minutes counted, so an agent never gets more than ``limit`` calls in any rolling hour.  The price is
    granularity: a call becomes available again 60 to 61 minutes after the call it replaces, not exactly 60.
    """

    def __init__(self, limit: int = 0, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._counts = [0] * BUCKETS
        self._total = 0
        self._minute = self._minute_of(clock())

    @staticmethod
    def _minute_of(now: float) -> int:
        return math.floor(now / BUCKET_S)

    def _roll(self, minute: int) -> None:
        """Move the window forward to ``minute``, clearing the buckets that fell out of it."""
        gap = minute - self._minute
        if gap <= 0:
            return  # a monotonic clock does not go back; an equal minute needs nothing
        if gap >= BUCKETS:
            self._counts = [0] * BUCKETS
            self._total = 0
        else:
            for passed in range(self._minute + 1, minute + 1):
                index = passed % BUCKETS
                self._total -= self._counts[index]
                self._counts[index] = 0
        self._minute = minute

    def used(self) -> int:
        """Calls counted in the current window."""
        self._roll(self._minute_of(self._clock()))
        return self._total

    def take(self) -> float | None:
        """Count one call: None when it may go ahead, else the seconds until the next call will be allowed."""
        now = self._clock()
        minute = self._minute_of(now)
        self._roll(minute)
        if self.limit and self._total >= self.limit:
            return self._wait(now, minute)
        self._counts[minute % BUCKETS] += 1
        self._total += 1
        return None

    def _wait(self, now: float, minute: int) -> float:
        """When the oldest minute holding calls leaves the window, the total drops below the limit again."""
        for oldest in range(minute - BUCKETS + 1, minute + 1):
            if self._counts[oldest % BUCKETS]:
                return max(0.0, (oldest + BUCKETS) * BUCKET_S - now)
        return 0.0  # not reached while limit > 0 and total >= limit

    def refusal(self, agent: str, wait: float) -> WireError:
        """The one error an over-budget request gets."""
        return WireError(
            RATE_LIMITED,
            f"agent '{agent}' has used its {self.limit} calls of the last hour (max_calls_per_hour); "
            f"the next call is allowed in {math.ceil(wait)} s",
        )
