"""Request rate limits: ``N/s``, ``N/min`` or ``N/h`` per client, counted in each worker.

A :class:`RateLimiter` keeps one token bucket per client (an API key's name, or a keyless
client's address): it holds up to ``N`` requests and refills at ``N`` per period, so a client
may send a burst of ``N`` and then ``N`` per period. Buckets live in the worker, so with
``ADAFACE_WORKERS=W`` a client gets up to ``W`` times its rate in all (documented in the README).
Keyless clients' buckets are kept for the most recent :data:`MAX_CLIENTS` addresses.
"""
from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from adaface.threads import allocate_lock

#: seconds in each period a rate may be given per
PERIODS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
#: buckets kept, at most (the least recently used goes first)
MAX_CLIENTS = 65_536
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([a-z]+)\s*")


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period`` seconds."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}[self.period]
        return f"{self.count:g}/{unit}"


def parse_rate(text: str) -> Optional[Rate]:
    """``"10/s"``, ``"600/min"``, ``"5000/h"`` -> :class:`Rate`; an empty string -> None (no limit).
    Raises ValueError naming the forms for anything else, or a count of 0."""
    if not text.strip():
        return None
    found = _RATE.fullmatch(text.lower())
    if found is None or found.group(2) not in PERIODS:
        raise ValueError(f"rate {text!r}: use N/s, N/min or N/h (N above 0)")
    count = float(found.group(1))
    if count <= 0:
        raise ValueError(f"rate {text!r}: N must be above 0 (leave the rate out for no limit)")
    return Rate(count, PERIODS[found.group(2)])


class RateLimiter:
    """Token buckets by client; :meth:`take` says whether a request may run now."""

    def __init__(self, clock=time.monotonic, max_clients: int = MAX_CLIENTS):
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict = OrderedDict()   # client -> (tokens, last refill)
        self._lock = allocate_lock()

    def take(self, client: str, rate: Optional[Rate]) -> float:
        """Spend one request of ``client``'s ``rate``: 0.0 when it may run, else the seconds until
        it may (for ``Retry-After``). No rate: always 0.0."""
        if rate is None:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (rate.count, now))
            tokens = min(rate.count, tokens + (now - last) * rate.per_second)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / rate.per_second
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return wait


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
