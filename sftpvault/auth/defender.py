"""The defender: per-source penalties and bans, and a cap on unauthenticated connections.

In the spirit of OpenSSH's PerSourcePenalties and MaxStartups: each
connection that ends without logging in (after refused attempts, or without
trying) adds a penalty point to its source address; a point expires
decay_seconds after it was earned, and a
source whose points reach the threshold is refused at connect time until its
ban expires (longer for repeat offenders). Separately, each source may hold
only a few unauthenticated connections at once, so idle connections from one
address cannot crowd out everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sftpvault.config import DefenderSettings

log = logging.getLogger("sftpvault.auth")

PENALTY = {"authfail": 1.0, "noauth": 1.0}  # per connection that ended without logging in


@dataclass
class _Source:
    earned: deque[tuple[float, float]] = field(default_factory=deque)  # (when, points) still counting
    banned_until: float = 0.0
    bans: int = 0
    pending: int = 0  # unauthenticated connections open now


class Defender:
    def __init__(self, settings: DefenderSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._sources: dict[str, _Source] = {}
        self._pending_total = 0
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock()

    def _source(self, ip: str) -> _Source:
        """The source's record, with points older than decay_seconds dropped."""
        source = self._sources.setdefault(ip, _Source())
        horizon = self._now() - self.settings.decay_seconds
        while source.earned and source.earned[0][0] <= horizon:
            source.earned.popleft()
        return source

    def admit(self, ip: str) -> str | None:
        """Call when a connection arrives: None to serve it, else why it is refused."""
        if not self.settings.enabled:
            return None
        with self._lock:
            source = self._source(ip)
            if source.banned_until > self._now():
                return f"banned for {source.banned_until - self._now():.0f} more seconds"
            if source.pending >= self.settings.max_unauthenticated_per_source:
                return "too many unauthenticated connections from this source"
            if self._pending_total >= self.settings.max_unauthenticated:
                return "too many unauthenticated connections"
            source.pending += 1
            self._pending_total += 1
            return None

    def authenticated(self, ip: str) -> None:
        """The connection logged in: it no longer counts as unauthenticated."""
        self._release(ip)

    def closed_unauthenticated(self, ip: str, kind: str) -> None:
        """The connection ended without logging in ("authfail" or "noauth"): release it and penalise."""
        self._release(ip)
        self.penalise(ip, kind)

    def _release(self, ip: str) -> None:
        if not self.settings.enabled:
            return
        with self._lock:
            source = self._source(ip)
            if source.pending:
                source.pending -= 1
                self._pending_total -= 1

    def penalise(self, ip: str, kind: str) -> None:
        if not self.settings.enabled:
            return
        with self._lock:
            source = self._source(ip)
            source.earned.append((self._now(), PENALTY[kind]))
            points = sum(p for _, p in source.earned)
            if points >= self.settings.threshold and source.banned_until <= self._now():
                duration = min(self.settings.ban_seconds * 2**source.bans, self.settings.max_ban_seconds)
                source.banned_until = self._now() + duration
                source.bans += 1
                source.earned.clear()
                log.warning("defender: banned %s for %.0f s (%s)", ip, duration, kind)
