"""The metering facade the ingress calls: price a usage record and record the charge exactly once.

`record()` prices the usage, updates the Prometheus counters and appends the charge to the process's durable
spool (fsync'd) before it returns. Background consumers then move spooled charges to the ledger (idempotent by
request id) and to the event sinks (at-least-once with stable ids). If the database is down, charges wait in
the spool; a crash leaves the spool for the next start to replay. See metering/spool.py and metering/drain.py.
Where a node drainer runs (metering/node_drain.py), the consumers stand by and that process delivers instead.

Cheap to construct (no database connection, no heavy import): the first connection and the migrations happen
in the ledger consumer's thread. Thread-safe.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from core.utc import to_utc
from hardware_profiles import ProfileCatalog
from metering import metrics
from metering.config import MeteringSettings
from metering.drain import (
    DEAD_LETTER_DIR,
    DeadLetter,
    DeadLetterFile,
    SpoolConsumer,
    describe_error,
    record_request_id,
)
from metering.errors import ChargesNotRecorded, InvalidLookup, LedgerUnavailable
from metering.events import EventSink, HttpCollectorSink, JsonLinesSink, PermanentDeliveryError, charge_event
from metering.ledger import Ledger, is_data_error, spooled_row
from metering.pricing import price_in_catalog
from metering.records import Charge, UsageRecord
from metering.reports import UsageReport, UsageRow
from metering.spool import Spool, encode_line

log = logging.getLogger(__name__)

LEDGER = "ledger"
EVENTS_FILE = "events-file"
EVENTS_HTTP = "events-http"
UNSPOOLED_RETRY_S = 1.0  # how often charges the spool could not write are offered to it again
# Charges held in memory at most (about 800 bytes each); past it, only the log keeps one.
MAX_UNSPOOLED = 100_000


def configured_consumers(settings: MeteringSettings) -> list[str]:
    """The spool consumers of the settings' destinations: the ledger, then the configured event sinks."""
    return [LEDGER] + [
        name
        for name, on in ((EVENTS_FILE, settings.events_file), (EVENTS_HTTP, settings.collector_url))
        if on
    ]


class MeteringService:
    """Prices usage, spools charges durably, and drains them to the ledger and the usage-event sinks.

    `sinks` adds event sinks by consumer name (the name keys the sink's spool offset, so keep it stable);
    `events_file` and `collector_url` in the settings add the file and HTTP sinks.
    """

    def __init__(
        self,
        settings: MeteringSettings,
        profiles: ProfileCatalog,
        *,
        sinks: dict[str, EventSink] | None = None,
        drainer: bool = False,
    ) -> None:
        """`drainer`: the node drainer's service (metering/node_drain.py), which records nothing and delivers
        every spool file in the directory, those of live processes too."""
        self.settings = settings
        self.profiles = profiles
        self._ledger: Ledger | None = None
        self._ledger_lock = threading.Lock()
        self._pending: dict[str, int] = {}  # request id -> cost of spooled charges not yet in the ledger
        self._pending_lock = threading.Lock()
        # Charges the spool could not write (a full or failing disk), oldest first, offered to it again every
        # UNSPOOLED_RETRY_S by a thread that runs while any are held (`_respool`).
        self._unspooled: list[dict[str, Any]] = []
        self._unspooled_lock = threading.Lock()
        self._respool_lock = threading.Lock()  # one retry at a time (the thread's, close()'s)
        self._unspooled_error = ""
        self._respooler: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False
        self.sinks: dict[str, EventSink] = {}
        self.spool: Spool | None = None
        self.consumers: list[SpoolConsumer] = []
        if not settings.enabled:
            return
        self.sinks = self._configured_sinks(sinks)
        self.spool = Spool(
            settings.resolved_spool_dir(),
            [LEDGER, *self.sinks],
            fsync=settings.spool_fsync,
            rotate_bytes=settings.spool_rotate_bytes,
            sync_process=settings.spool_sync_process,
            inline_sync_below_s=settings.spool_inline_sync_below_s,
            direct_io=settings.spool_direct_io,
            writer=not drainer,
            hand_off=not sinks,  # a sink given in code is this process's own: no drainer delivers to it
        )
        # A drainer re-scans as often as it drains: a new serving process's file is taken up within that.
        adopt_interval_s = settings.drain_interval_s if drainer else settings.adopt_interval_s
        self.consumers = [
            self._consumer(
                LEDGER,
                self._deliver_to_ledger,
                settings.drain_batch_size,
                refused=is_data_error,
                dead_letter=self._dead_letter_to_ledger,
                adopt_interval_s=adopt_interval_s,  # re-scans for orphaned files: one consumer does it
            )
        ]
        for name, sink in self.sinks.items():
            size = (
                settings.collector_batch_size
                if isinstance(sink, HttpCollectorSink)
                else settings.drain_batch_size
            )
            deliver, dead_letter = self._sink_delivery(sink), self._sink_dead_letters(name)
            self.consumers.append(self._consumer(name, deliver, size, dead_letter=dead_letter))
        for consumer in self.consumers:
            consumer.start()

    # Construction helpers

    def _configured_sinks(self, extra: dict[str, EventSink] | None) -> dict[str, EventSink]:
        s = self.settings
        sinks: dict[str, EventSink] = {}
        if s.events_file:
            sinks[EVENTS_FILE] = JsonLinesSink(s.events_file)
        if s.collector_url:
            sinks[EVENTS_HTTP] = HttpCollectorSink(
                s.collector_url, token=s.collector_token, timeout_s=s.collector_timeout_s
            )
        for name, sink in (extra or {}).items():
            if name == LEDGER or name in sinks:
                raise ValueError(f"sink name {name!r} is taken")
            sinks[name] = sink
        return sinks

    def _consumer(self, name: str, deliver: Any, batch_size: int, **dead_letters: Any) -> SpoolConsumer:
        """The consumer `name`; `dead_letters`: its `refused` test and `dead_letter` store (SpoolConsumer)."""
        s = self.settings
        return SpoolConsumer(
            name,
            self.spool,  # type: ignore[arg-type]
            deliver,
            batch_size=batch_size,
            interval_s=s.drain_interval_s,
            retry_initial_s=s.retry_initial_s,
            retry_max_s=s.retry_max_s,
            **dead_letters,
        )

    @property
    def ledger(self) -> Ledger:
        """The ledger (created on first use; its engine connects lazily)."""
        with self._ledger_lock:
            if self._ledger is None:
                self._ledger = Ledger(self.settings.resolved_database_url())
            return self._ledger

    # Recording

    def record(self, usage: UsageRecord) -> Charge:
        """Price `usage` and spool the charge durably before returning it.

        Raises InvalidUsage (a caller bug: unknown profile, no price in force, negative time) and nothing
        else: a charge the spool cannot write (a full disk) is logged whole, counted, held in memory and written
        once the spool takes it (`check_recording` refuses new requests meanwhile), and still returned. Blocks for one fsync of the spool (about 0.1-2 ms on an SSD; concurrent callers share it):
        in an event loop, use `record_async`.
        """
        charge, data = self._price(usage)
        if data is not None:
            try:
                self.spool.append(data)  # type: ignore[union-attr]
            except Exception as err:
                self._spool_failed(data, err)
        return charge

    async def record_async(self, usage: UsageRecord) -> Charge:
        """`record` for an event loop: the charge is fsync'd before this returns, but the loop never waits for the
        disk (see `Spool.append_async`: the sync process by default). With metering off, prices only."""
        charge, data = self._price(usage)
        if data is not None:
            try:
                await self.spool.append_async(data)  # type: ignore[union-attr]
            except Exception as err:
                self._spool_failed(data, err)
        return charge

    def _price(self, usage: UsageRecord) -> tuple[Charge, dict[str, Any] | None]:
        """The charge, counted in the metrics, and its spool record (None when metering is off)."""
        charge = price_in_catalog(usage, self.profiles, self.settings.min_charge_nanousd)
        try:
            metrics.observe_charge(charge)
        except Exception:  # metrics must never lose a charge
            log.exception("metering: metrics update failed")
        if self.spool is None:
            return charge, None
        if self.spool.handed_off:  # the node drainer delivers it; the look-up finds it in the ledger then
            if self._pending:
                with self._pending_lock:
                    self._pending.clear()
        else:
            with self._pending_lock:
                self._pending[charge.request_id] = charge.cost_nanousd
        return charge, charge.spool_record()

    def prepare(self, hardware_profile: str) -> None:
        """Price a request of the profile once, recording nothing (no spool, no metrics): the price terms of its
        price in force are then made before the first real charge needs them."""
        usage = UsageRecord("prepare", dt.datetime.now(dt.timezone.utc), "-", "-", "-", hardware_profile, 0)
        price_in_catalog(usage, self.profiles, self.settings.min_charge_nanousd)

    def start_sync_process(self) -> None:
        """Start the spool's sync process now, not at the first charge (a serving replica, before its traffic)."""
        if self.spool is not None:
            self.spool.start_sync_process()

    # A spool that cannot write

    def check_recording(self) -> None:
        """Raise ChargesNotRecorded (503) while this process holds charges its spool could not write and
        `refuse_when_unspooled` is on: call it before a request runs, so that no compute is given away without a
        durable charge. Free otherwise (one attribute read)."""
        if self._unspooled and self.settings.refuse_when_unspooled:
            raise ChargesNotRecorded(
                "This server cannot record charges right now: the request was not run. Try again shortly.",
                retry_after_s=UNSPOOLED_RETRY_S,
            )

    @property
    def unspooled_charges(self) -> int:
        """How many charges wait in memory for the spool (0 while it writes)."""
        return len(self._unspooled)

    def _spool_failed(self, data: dict[str, Any], err: BaseException) -> None:
        """Keep a charge the spool could not write in memory, and offer it again until the spool takes it. Logged
        whole as well, as its spool line: the log is what is left if the process dies before the disk is back,
        and those lines, put in a `.jsonl` file of the spool directory, are delivered at the next start."""
        metrics.observe_error("spool")
        error = describe_error(err)
        log.error(
            "metering: could not spool charge (%s), held in memory and retried; recover it from this line: %s",
            error,
            encode_line(data).decode().rstrip("\n"),
        )
        with self._unspooled_lock:
            self._unspooled_error = error
            if len(self._unspooled) < MAX_UNSPOOLED:
                self._unspooled.append(data)
            else:
                metrics.observe_error("spool-lost")
                log.error("metering: %d charges held already: this one is only in the log", MAX_UNSPOOLED)
            metrics.set_unspooled(len(self._unspooled))
            if self._respooler is None and not self._closed:
                self._respooler = threading.Thread(target=self._respool, name="metering-respool", daemon=True)
                self._respooler.start()

    def _respool(self) -> None:
        """Offer the held charges to the spool every UNSPOOLED_RETRY_S until it takes all of them (or close)."""
        while not self._stopping.wait(UNSPOOLED_RETRY_S):
            if self._respool_once():
                return

    def _respool_once(self) -> bool:
        """Write the held charges to the spool in one durable write; True once none is held (the thread ends
        then: the next failure starts another)."""
        with self._respool_lock:
            with self._unspooled_lock:
                held = list(self._unspooled)
            if held:
                try:
                    self.spool.append_many(held)  # type: ignore[union-attr]
                except Exception as err:
                    with self._unspooled_lock:
                        self._unspooled_error = describe_error(err)
                    return False
                log.warning(
                    "metering: the spool takes charges again: %d held charges are on disk now", len(held)
                )
            with self._unspooled_lock:
                del self._unspooled[: len(held)]  # failures meanwhile were appended after them
                metrics.set_unspooled(len(self._unspooled))
                if self._unspooled:
                    return False
                self._respooler = None
                return True

    def _deliver_to_ledger(self, records: list[dict[str, Any]]) -> None:
        """Insert the records' charges (idempotent). Raises what the ledger raised: the consumer retries the
        batch, or isolates and dead-letters the records the database refuses (`is_data_error`)."""
        rows, unreadable = [], []
        for data in records:
            try:
                rows.append(spooled_row(data))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                metrics.observe_error("spool-decode")
                log.error("metering: an unreadable spooled charge, dead-lettered (%s): %s", err, data)
                unreadable.append(DeadLetter(data, f"unreadable charge: {describe_error(err)}"))
        if unreadable:  # kept once however often the batch is retried: identical records are not added twice
            self._dead_letter_to_ledger(unreadable)
        self.ledger.insert_rows(rows)
        if self._pending:  # a node drainer's service has none
            with self._pending_lock:
                for row in rows:
                    self._pending.pop(row[0], None)

    def _dead_letter_to_ledger(self, letters: list[DeadLetter]) -> None:
        """Keep the charges the ledger refused in its `metering_dead_letters` table (`hfi metering dead-letters`).

        In the ledger's database: durable, and where an operator already looks. When that fails too (the
        database went down meanwhile), this raises and the consumer retries the batch later."""
        self.ledger.add_dead_letters(LEDGER, [(d.record, d.error) for d in letters])
        with self._pending_lock:  # never going to be in the ledger: the cost look-up stops answering them
            for d in letters:
                rid = record_request_id(d.record)
                if isinstance(rid, str):
                    self._pending.pop(rid, None)

    def _sink_dead_letters(self, name: str) -> Any:
        """The dead-letter file of sink `name`; each line carries the refused event beside its charge."""
        source, event_type = self.settings.events_source, self.settings.events_type
        path = self.settings.resolved_spool_dir() / DEAD_LETTER_DIR / f"{name}.jsonl"

        def event(record: dict[str, Any]) -> dict[str, Any]:
            try:
                return {"event": charge_event(record, source=source, event_type=event_type)}
            except (KeyError, TypeError, ValueError):  # not a charge's record: the record alone says it all
                return {}

        return DeadLetterFile(path, name, event).add

    def _sink_delivery(self, sink: EventSink) -> Any:
        source, event_type = self.settings.events_source, self.settings.events_type

        def deliver(records: list[dict[str, Any]]) -> None:
            try:
                events = [charge_event(r, source=source, event_type=event_type) for r in records]
            except (KeyError, TypeError, ValueError) as err:  # no event of it: refused, like a 400
                raise PermanentDeliveryError(f"not a charge record: {describe_error(err)}") from err
            sink.emit(events)

        return deliver

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Deliver everything spooled so far to the ledger and every sink now; False if that took too long."""
        if self.spool is None:
            return True
        names = [c.name for c in self.consumers]
        if self.spool.handed_off:
            return self.spool.wait_delivered_by_drainer(names, timeout_s)
        for consumer in self.consumers:
            consumer.wake()
        return self.spool.wait_drained(names, timeout_s)

    # Reading

    def usage_report(
        self,
        since: dt.datetime | dt.date | None = None,
        until: dt.datetime | dt.date | None = None,
        *,
        account: str | None = None,
    ) -> UsageReport:
        """Usage per account, model, task, profile and UTC day over [since, until), with exact totals."""
        since_dt, until_dt = to_utc(since), to_utc(until)
        try:
            grouped = self.ledger.grouped_usage(since_dt, until_dt, account=account)
        except OperationalError as err:
            raise _unavailable(err) from err
        return UsageReport(since_dt, until_dt, account, [UsageRow(**g) for g in grouped])

    def charges(
        self,
        since: dt.datetime | dt.date | None = None,
        until: dt.datetime | dt.date | None = None,
        *,
        account: str | None = None,
        limit: int | None = None,
    ) -> list[Charge]:
        """The raw charges (one per request) with since <= started_at < until, oldest first."""
        try:
            return self.ledger.charges(to_utc(since), to_utc(until), account=account, limit=limit)
        except OperationalError as err:
            raise _unavailable(err) from err

    def cost_lookup(self, request_ids: Sequence[str]) -> list[dict[str, Any]]:
        """`[{"requestId", "costNanoUsd"}]` for Hugging Face's billing endpoint, integers from the ledger.

        In the order asked, each id once. An id that is not in the ledger is omitted (unknown, or still in
        another process's spool: ask again later); an id this process recorded but has not drained yet is
        answered with its cost. Raises InvalidLookup (400) for a body that is not a list of strings or is
        longer than `cost_lookup_max_ids`, LedgerUnavailable (503) when the database cannot be read.
        """
        ids = validate_request_ids(request_ids, self.settings.cost_lookup_max_ids)
        try:
            found = self.ledger.costs(ids)
        except OperationalError as err:
            raise _unavailable(err) from err
        with self._pending_lock:
            for rid in ids:
                if rid not in found and rid in self._pending:
                    found[rid] = self._pending[rid]
        return [{"requestId": rid, "costNanoUsd": int(found[rid])} for rid in ids if rid in found]

    def backlog(self) -> dict[str, Any]:
        """This process's charges spooled and not yet in the ledger: how many, their bytes, the drain lag
        (seconds since the ledger consumer last had nothing left to deliver; 0 when nothing waits), and whether
        the node drainer delivers them (`node_drainer`; then the counts come from its saved progress, and the lag
        is how long the oldest undelivered charge has waited since its request started)."""
        with self._pending_lock:
            pending = len(self._pending)
        pending_bytes, lag_s, handed_off = 0, 0.0, False
        if self.spool is not None and not self._closed:
            handed_off = self.spool.handed_off
            if handed_off:  # the node drainer's progress on this process's files
                pending, pending_bytes, lag_s = self.spool.pending_on_disk(LEDGER)
            else:
                pending_bytes = self.spool.pending(LEDGER)
                consumer = next((c for c in self.consumers if c.name == LEDGER), None)
                if consumer is not None and (pending or pending_bytes):
                    lag_s = max(0.0, time.monotonic() - consumer.caught_up_at)
        return {
            "pending_charges": pending,
            "pending_bytes": pending_bytes,
            "drain_lag_s": round(lag_s, 3),
            "node_drainer": handed_off,
            "unspooled_charges": len(self._unspooled),
        }

    def check_provider_secret(self, presented: str | None) -> bool:
        """True when the billing endpoint's caller presented the provider secret (constant time)."""
        secret = self.settings.provider_secret
        if not secret or not presented:
            return False
        return hmac.compare_digest(secret.encode(), presented.encode())

    # Life cycle

    def close(self) -> None:
        """Drain what can be drained within close_timeout_s, stop the threads, release the spool."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._unspooled and not self._respool_once():
            log.error(
                "metering: closing with %d charges the spool could not write (%s): each is in this log, above",
                len(self._unspooled),
                self._unspooled_error,
            )
        if self.spool is not None:
            # Handed off: the node drainer takes the files over once they are let go, with no wait here.
            if not self.spool.handed_off and not self.flush(self.settings.close_timeout_s):
                log.warning("metering: closing with undelivered charges; the next start replays them")
            for consumer in self.consumers:
                consumer.stop()
            self.spool.close()
        for sink in self.sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        with self._ledger_lock:
            if self._ledger is not None:
                self._ledger.close()

    def __enter__(self) -> MeteringService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def validate_request_ids(request_ids: Iterable[Any], max_ids: int) -> list[str]:
    """The ids as a de-duplicated list of strings; InvalidLookup (400) when they are not."""
    if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, (list, tuple)):
        raise InvalidLookup("requestIds must be a list of strings")
    if len(request_ids) > max_ids:
        raise InvalidLookup(f"requestIds: at most {max_ids} ids per request, got {len(request_ids)}")
    if not all(isinstance(r, str) for r in request_ids):
        raise InvalidLookup("requestIds must be a list of strings")
    return list(dict.fromkeys(request_ids))


def _unavailable(err: OperationalError) -> LedgerUnavailable:
    return LedgerUnavailable(f"the ledger database cannot be reached: {type(err.orig).__name__}")
