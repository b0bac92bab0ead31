"""A small thread-safe cache with a time to live and a bound on its size (admission's token and policy look-ups)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


class TtlCache(Generic[V]):
    """Entries live `ttl_s` seconds of `clock_s` (0: nothing is kept); past `max_entries` the oldest go first."""

    def __init__(self, ttl_s: float, max_entries: int, clock_s: Callable[[], float]) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be 1 or more")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock_s = clock_s
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable, default: object = _MISSING) -> V | object:
        """The live value of `key`, or `default` (a sentinel unless given) when absent or expired."""
        if self.ttl_s <= 0:
            return default
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            if entry[0] <= self._clock_s():
                del self._entries[key]
                return default
            return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        """Keep `value` for `ttl_s` seconds from now (nothing when the cache is off)."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock_s() + self.ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (an account was changed in this process)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def missing(value: object) -> bool:
    """Whether `TtlCache.get` found nothing."""
    return value is _MISSING
