"""Restart backoff shared by nulld (services) and cage (agents): one policy, one implementation.

Delays double from ``initial`` up to ``cap``; a run that lasted at least ``reset_after`` seconds counts as
healthy and starts the sequence again.  Computed from timestamps when a process exits, so nothing needs a
timer while the process runs (an idle supervisor does not wake up).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 300.0

    def delay(self, failures: int) -> float:
        """The wait before restart number ``failures`` (1 = first restart after a failure)."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.initial * self.factor ** (failures - 1))


@dataclass
class Backoff:
    """The restart history of one supervised thing."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    failures: int = 0

    def next_delay(self, uptime: float) -> float:
        """Record an exit after ``uptime`` seconds of running and return how long to wait before restarting."""
        if uptime >= self.policy.reset_after:
            self.failures = 0
        self.failures += 1
        return self.policy.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0
