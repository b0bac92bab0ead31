"""`GET /health`: the service is up; is its database? Probed at most once per `ttl_s`, never on every call.

The service serves while the database is down: in open mode requests run and their charges wait in the spool;
in tokens mode admission answers 503 until the database is back. So /health answers 200 either way, with
`"status": "degraded"` and `"database": "unavailable"` while the database cannot be reached; likewise, with
`"unspooled_charges"`, while this process holds charges its spool could not write (a full disk: requests get
503 until the spool takes them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from billing.db import ping
from metering.service import LEDGER

log = logging.getLogger("serving.health")

OK = "ok"
UNAVAILABLE = "unavailable"


class DatabaseProbe:
    """The database's state, from one `check()` (a round trip) at most every `ttl_s`.

    Concurrent callers share one probe. A probe that takes longer than `wait_s` (a host that drops packets)
    answers UNAVAILABLE to the caller; its result is kept when it ends.
    """

    def __init__(
        self,
        check: Callable[[], None],
        *,
        ttl_s: float = 5.0,
        wait_s: float = 2.0,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self._clock_s = clock_s
        self._lock = threading.Lock()
        self._state: str | None = None
        self._checked_at_s = -math.inf
        self.probes = 0  # how many round trips were made (a cache that works keeps this low)

    def _fresh(self) -> str | None:
        if self._state is not None and self._clock_s() - self._checked_at_s < self.ttl_s:
            return self._state
        return None

    async def state(self) -> str:
        """OK or UNAVAILABLE: the cached state while fresh, else a new probe in a worker thread."""
        cached = self._fresh()
        if cached is not None:
            return cached
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.refresh), self.wait_s)
        except asyncio.TimeoutError:
            return UNAVAILABLE

    def refresh(self) -> str:
        """Probe now unless another thread just did (blocking: call it from a worker thread)."""
        if not self._lock.acquire(timeout=self.wait_s):
            return self._state or UNAVAILABLE
        try:
            cached = self._fresh()  # a concurrent caller may have probed while this one waited
            if cached is not None:
                return cached
            self.probes += 1
            try:
                self._check()
                state = OK
            except Exception as err:  # any failure to reach it: the driver's, a timeout, a refused connection
                if self._state != UNAVAILABLE:
                    log.warning("health: the database cannot be reached: %s", err)
                state = UNAVAILABLE
            if state == OK and self._state == UNAVAILABLE:
                log.info("health: the database is reachable again")
            self._state, self._checked_at_s = state, self._clock_s()
            return state
        finally:
            self._lock.release()


def database_probe(core: Any) -> DatabaseProbe:
    """The probe of `core`'s database (billing's engine: the same database as the ledger's)."""
    engine = core.billing.engine
    return DatabaseProbe(lambda: ping(engine))


async def health_report(core: Any, probe: DatabaseProbe) -> dict[str, Any]:
    """The body of GET /health (always answered 200: see the module docstring)."""
    database = await probe.state()
    mode = core.settings.billing.mode
    report: dict[str, Any] = {
        "status": OK if database == OK else "degraded",
        "database": database,
        "billing_mode": mode,
        # Open mode admits without the database; tokens mode needs it for every admission.
        "admission": OK if mode == "open" or database == OK else UNAVAILABLE,
        "models": await model_states(core),
    }
    spool = core.metering.spool
    if spool is not None:
        report["spool_pending_bytes"] = spool.pending(LEDGER)  # charges not yet in the ledger
        unspooled = core.metering.unspooled_charges
        if unspooled:  # the spool cannot write: those charges wait in memory
            report["unspooled_charges"] = unspooled
            report["status"] = "degraded"
            if core.settings.metering.refuse_when_unspooled:
                report["admission"] = UNAVAILABLE
    return report


ON_DEMAND = "on_demand"  # a pooled model: its pool's replicas are up and load it on its first request


async def model_states(core: Any) -> dict[str, str]:
    """Each model's state: loaded (a replica can answer now), loading (a replica is starting), scaled_to_zero (none,
    and none wanted until a request comes), or, for a pooled model, its pool's: on_demand or loading.

    From Serve's replica counts (read at most once a second, serving/replicas.py); a backend without them (the
    in-process server: every model loaded in this process) says loaded."""
    from serving.app import app_name
    from serving.replicas import LOADED, replica_state

    catalog = core.catalog
    counts_reader = getattr(core.backend, "replica_counts", None)  # a backend of Ray handles has them
    if counts_reader is None:
        return {m.id: LOADED for m in catalog.models}
    cold = getattr(core.backend, "cold_starts", None)
    counts = await counts_reader.get()
    states: dict[str, str] = {}
    for spec in catalog.models:
        state = replica_state(counts.get(app_name(spec, core.settings, catalog)))
        if cold is not None and spec.id in cold:
            state = await cold.state(spec.id)  # a start this process asked for counts as loading at once
        if spec.pool is not None and state == LOADED:
            state = ON_DEMAND
        states[spec.id] = state
    return states
