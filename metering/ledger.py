"""The ledger: one row per charge, keyed by a unique request id, in SQLite or PostgreSQL (SQLAlchemy 2).

The schema is owned by the Alembic migrations in metering/migrations (version table
`metering_alembic_version`, so billing can keep its own migrations in the same database), run by
core.migrations. Inserting a request id that is already there is a no-op, which is what makes spool replays and
retries safe.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError, StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.db import LEDGER, make_engine
from core.migrations import Migrations, upgrade
from core.utc import as_utc
from metering.records import Charge, UsageRecord

VERSION_TABLE = "metering_alembic_version"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The ledger's engine lets the driver begin its transactions on SQLite (core.db), so a process can lose the race
# to create the tables to another one starting beside it: it tries again and finds them there.
MIGRATIONS = Migrations("metering", MIGRATIONS_DIR, VERSION_TABLE, pg_lock_key=727274001, race_attempts=3)
_INSERT_CHUNK_ROWS = 200  # 28 columns x 200 rows stays far below SQLite's bound-parameter limit
_LOOKUP_CHUNK_IDS = 500


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as naive UTC (portable across SQLite and PostgreSQL) and read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


_BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY


class Base(DeclarativeBase):
    """Declarative base of the metering tables."""


class ChargeRow(Base):
    """One charge. Money in integer nano-USD, times in integer nanoseconds / milliseconds."""

    __tablename__ = "metering_charges"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    day: Mapped[dt.date] = mapped_column(Date)  # UTC date of started_at: the reports group by it
    model_id: Mapped[str] = mapped_column(String(256))
    revision: Mapped[str] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(64))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    price_usd_per_hour: Mapped[str] = mapped_column(String(40))
    price_effective_from: Mapped[dt.date] = mapped_column(Date)
    compute_ns: Mapped[int] = mapped_column(BigInteger)
    compute_ms: Mapped[int] = mapped_column(BigInteger)
    queue_ns: Mapped[int] = mapped_column(BigInteger)
    total_ns: Mapped[int] = mapped_column(BigInteger)
    batch_size: Mapped[int] = mapped_column(Integer)
    # The batch a request shared (rows with one batch_id have compute_ns adding up to batch_compute_ns).
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    batch_compute_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    input_characters: Mapped[int] = mapped_column(BigInteger)
    input_images: Mapped[int] = mapped_column(Integer)
    input_audio_seconds: Mapped[float] = mapped_column(Float)
    cost_nanousd: Mapped[int] = mapped_column(BigInteger)
    user: Mapped[str] = mapped_column(String(256))
    billed_account: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(32))
    client_request_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    extra: Mapped[str | None] = mapped_column(String, nullable=True)  # JSON text
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


charges_table = ChargeRow.__table__

DEAD_LETTER_ERROR_CHARS = 2000  # the error column's bound: a driver message with its parameters fits


class DeadLetterRow(Base):
    """A spooled record the ledger refused for good (a value no column takes), kept whole for an operator.

    Every column but `error` is unbounded text, so that any record fits: the record as ASCII JSON, the request id
    as it came (not unique: a replay after a crash may bury the same record twice; none is lost)."""

    __tablename__ = "metering_dead_letters"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    consumer: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(String(DEAD_LETTER_ERROR_CHARS))
    record: Mapped[str] = mapped_column(Text)  # JSON text
    dead_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


dead_letters_table = DeadLetterRow.__table__


class UnstorableCharge(ValueError):
    """A charge with a value the ledger's columns cannot take (found before the database was asked)."""


def charge_to_row(charge: Charge, recorded_at: dt.datetime) -> dict[str, Any]:
    """The ledger row of a charge: the row of its spool record (`spooled_row`), by column name."""
    row = dict(zip(_ROW_COLUMNS, spooled_row(charge.to_dict()), strict=True))
    row["recorded_at"] = recorded_at
    return row


_ROW_COLUMNS = tuple(c.name for c in charges_table.columns if c.name != "id")  # what charge_to_row fills
_RECORDED_AT = _ROW_COLUMNS.index("recorded_at")
_USAGE_DEFAULTS = {f.name: f.default for f in fields(UsageRecord) if f.default is not MISSING}


def spooled_row(data: dict[str, Any]) -> list[Any]:
    """The ledger row of a spooled charge record (`Charge.to_dict`), as the values of `_ROW_COLUMNS` in order
    (recorded_at None: the insert sets it): what `Ledger.insert_rows` takes, and the one definition of a row.

    Made straight from the record: the node drainer's path, where building a Charge and a row dict first was most
    of its own time per charge. Raises KeyError, TypeError, ValueError or AttributeError for a record that is not a
    charge (missing fields, a time or date that does not parse), as `Charge.from_dict` does; the other values go to
    the database as they are, and it refuses what its columns cannot take (the drain then isolates and
    dead-letters that record).
    """
    import json

    get = data.get
    started = as_utc(dt.datetime.fromisoformat(data["started_at"].replace("Z", "+00:00")))
    extra = get("extra")
    d = _USAGE_DEFAULTS
    return [  # in _ROW_COLUMNS order (checked below)
        data["request_id"],
        started,
        started.date(),
        data["model_id"],
        data["revision"],
        data["task"],
        data["hardware_profile"],
        str(data["price_usd_per_hour"]),
        dt.date.fromisoformat(str(data["price_effective_from"])),
        data["compute_ns"],
        int(data["compute_ms"]),
        get("queue_ns", d["queue_ns"]),
        get("total_ns", d["total_ns"]),
        get("batch_size", d["batch_size"]),
        get("batch_id", d["batch_id"]),
        get("batch_compute_ns", d["batch_compute_ns"]),
        get("input_characters", d["input_characters"]),
        get("input_images", d["input_images"]),
        float(get("input_audio_seconds", d["input_audio_seconds"])),
        int(data["cost_nanousd"]),
        get("user", d["user"]),
        get("billed_account", d["billed_account"]),
        get("status", d["status"]),
        get("client_request_id", d["client_request_id"]),
        json.dumps(extra, sort_keys=True, default=str) if extra else None,
        None,  # recorded_at: the insert's
    ]


_SPOOLED_ORDER = [
    "request_id",
    "started_at",
    "day",
    "model_id",
    "revision",
    "task",
    "hardware_profile",
    "price_usd_per_hour",
    "price_effective_from",
    "compute_ns",
    "compute_ms",
    "queue_ns",
    "total_ns",
    "batch_size",
    "batch_id",
    "batch_compute_ns",
    "input_characters",
    "input_images",
    "input_audio_seconds",
    "cost_nanousd",
    "user",
    "billed_account",
    "status",
    "client_request_id",
    "extra",
    "recorded_at",
]
if tuple(_SPOOLED_ORDER) != _ROW_COLUMNS:  # a column added to the table must be added to spooled_row too
    raise RuntimeError(f"spooled_row's columns {_SPOOLED_ORDER} are not the ledger's {_ROW_COLUMNS}")


def row_to_charge(row: Any) -> Charge:
    """The charge a ledger row holds."""
    import json

    m = row._mapping
    usage = UsageRecord(
        request_id=m["request_id"],
        started_at=m["started_at"],
        model_id=m["model_id"],
        revision=m["revision"],
        task=m["task"],
        hardware_profile=m["hardware_profile"],
        compute_ns=int(m["compute_ns"]),
        queue_ns=int(m["queue_ns"]),
        total_ns=int(m["total_ns"]),
        batch_size=int(m["batch_size"]),
        batch_id=m["batch_id"],
        batch_compute_ns=None if m["batch_compute_ns"] is None else int(m["batch_compute_ns"]),
        input_characters=int(m["input_characters"]),
        input_images=int(m["input_images"]),
        input_audio_seconds=float(m["input_audio_seconds"]),
        user=m["user"],
        billed_account=m["billed_account"],
        status=m["status"],
        client_request_id=m["client_request_id"],
        extra=json.loads(m["extra"]) if m["extra"] else {},
    )
    return Charge(
        usage=usage,
        compute_ms=int(m["compute_ms"]),
        price_usd_per_hour=m["price_usd_per_hour"],
        price_effective_from=m["price_effective_from"],
        cost_nanousd=int(m["cost_nanousd"]),
    )


def _request_id(row: dict[str, Any]) -> str:
    return row["request_id"]


def _sqlite_datetime(value: dt.datetime | None) -> str | None:
    """A UTCDateTime as SQLite stores it (naive UTC, `YYYY-MM-DD HH:MM:SS.ffffff`), written by datetime's C code."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return dt.datetime.isoformat(value, " ", "microseconds")


def _sqlite_date(value: dt.date | None) -> str | None:
    """A Date as SQLite stores it (`YYYY-MM-DD`; a datetime's date part), written by date's C code."""
    return None if value is None else dt.date.isoformat(value)


_QUICK_SAMPLES: dict[type, tuple[Any, ...]] = {
    UTCDateTime: (
        dt.datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 3, 1, 23, 59, 59, tzinfo=dt.timezone(dt.timedelta(hours=-2))),
        dt.datetime(999, 1, 2, 3, 4, 5, 6),
        None,
    ),
    Date: (dt.date(2026, 3, 1), dt.date(5, 1, 1), dt.datetime(2026, 3, 1, 12, 30), None),
}


def _quick_processor(column_type: Any, dialect: Any) -> Any:
    """On SQLite, the bind processor of a date or time column done by the datetime module's C code instead of
    SQLAlchemy's string formatting in Python (about 6 us a charge of the drain's ~30): the same text, checked here
    against SQLAlchemy's own on a few values, or None (its own is used)."""
    quick = {UTCDateTime: _sqlite_datetime, Date: _sqlite_date}.get(type(column_type))
    if dialect.name != "sqlite" or quick is None:
        return None
    own = column_type._cached_bind_processor(dialect)
    if own is None or any(quick(v) != own(v) for v in _QUICK_SAMPLES[type(column_type)]):
        return None
    return quick


def _first(values: list[Any]) -> Any:
    return values[0]


class Ledger:
    """The charge ledger in one database: idempotent inserts, reports and look-ups."""

    def __init__(self, database_url: str, *, engine: Engine | None = None) -> None:
        self.database_url = database_url
        self.engine = engine or make_engine(database_url, LEDGER)
        self._migrated = False
        self._migrate_lock = threading.Lock()
        self._insert_stmt: Any = None
        self._driver_stmt: tuple[str, list[tuple[int, Any]], Any] | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def ensure_schema(self) -> None:
        """Run the migrations once per Ledger object."""
        with self._migrate_lock:
            if not self._migrated:
                upgrade(self.engine, MIGRATIONS)
                self._migrated = True

    def insert(self, charges: Sequence[Charge]) -> list[str]:
        """Insert charges whose request id is new; return the ids actually inserted (replays: none)."""
        self.ensure_schema()
        if not charges:
            return []
        now = dt.datetime.now(dt.timezone.utc)
        # Sorted by request id: concurrent writers (several ingress replicas, a replay beside a drain) then take
        # the unique index's row locks in one order, so overlapping inserts wait for each other, never deadlock.
        rows = sorted({c.request_id: charge_to_row(c, now) for c in charges}.values(), key=_request_id)
        inserted: list[str] = []
        with self.engine.begin() as conn:
            # One statement for any number of rows (executemany): SQLAlchemy compiles it once and caches it, and
            # sends the rows as multi-row VALUES batches ("insertmanyvalues"); RETURNING names the rows that were
            # new (ON CONFLICT DO NOTHING skips replays). Compiling a fresh multi-row VALUES statement for every
            # drained batch cost the drain thread most of its CPU.
            for i in range(0, len(rows), _INSERT_CHUNK_ROWS):
                result = conn.execute(self._insert_statement(), rows[i : i + _INSERT_CHUNK_ROWS])
                inserted.extend(r[0] for r in result)
        return inserted

    def insert_new(self, charges: Sequence[Charge]) -> None:
        """`insert` without the ids back: the cheapest path per charge (`insert_rows`)."""
        try:
            rows = [spooled_row(c.to_dict()) for c in charges]
        except (TypeError, ValueError, OverflowError, AttributeError) as err:  # as insert_rows says
            raise UnstorableCharge(f"{type(err).__name__}: {err}") from err
        self.insert_rows(rows)

    def insert_rows(self, rows: Sequence[list[Any]]) -> None:
        """Insert charges given as row values (`spooled_row`; recorded_at is set here), those whose
        request id is not there yet: the spool drain's path. Keeps the last of the rows with the same id.

        One executemany at the driver (SQLite's, psycopg's pipeline) of a statement prepared once: no
        statement compilation or per-row parameter processing by SQLAlchemy, which cost the drain about 15 us
        per charge beside the database's own ~12 us. Same rows, same idempotency (`ON CONFLICT (request_id)
        DO NOTHING`), same lock order (by request id).
        """
        self.ensure_schema()
        if not rows:
            return
        sql, converters, convert_time = self._driver_insert()
        now = dt.datetime.now(dt.timezone.utc)
        recorded_at = convert_time(now) if convert_time else now  # the batch's, converted once
        try:
            unique = sorted({values[0]: values for values in rows}.values(), key=_first)
            params = []
            for values in unique:
                values = list(values)
                for i, convert in converters:
                    values[i] = convert(values[i])
                values[_RECORDED_AT] = recorded_at
                params.append(tuple(values))
        except (TypeError, ValueError, OverflowError, AttributeError, IndexError) as err:
            # A value of the wrong kind in a charge (a spool record edited by hand, or written by a buggy
            # version): a refusal of the data, which the drain isolates, never a reason to retry forever.
            raise UnstorableCharge(f"{type(err).__name__}: {err}") from err
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, params)

    def _driver_insert(self) -> tuple[str, list[tuple[int, Any]], Any]:
        """The driver-level INSERT of every row column (placeholders in the driver's style), the SQLAlchemy bind
        processors of the columns that have one (dates and times as each database stores them) by position,
        and recorded_at's apart (one value per batch)."""
        if self._driver_stmt is None:
            dialect = self.engine.dialect
            quote = dialect.identifier_preparer.quote
            mark = "?" if dialect.paramstyle == "qmark" else "%s"
            sql = (
                f"INSERT INTO {quote(charges_table.name)} ({', '.join(quote(n) for n in _ROW_COLUMNS)}) "
                f"VALUES ({', '.join([mark] * len(_ROW_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
            )
            processors = [
                _quick_processor(charges_table.c[n].type, dialect)
                or charges_table.c[n].type._cached_bind_processor(dialect)
                for n in _ROW_COLUMNS
            ]
            converters = [(i, p) for i, p in enumerate(processors) if p is not None and i != _RECORDED_AT]
            self._driver_stmt = (sql, converters, processors[_RECORDED_AT])
        return self._driver_stmt

    def _insert_statement(self) -> Any:
        if self._insert_stmt is None:
            self._insert_stmt = (
                self._dialect_insert()(charges_table)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(charges_table.c.request_id)
            )
        return self._insert_stmt

    def _dialect_insert(self) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - guarded by the supported URLs
            raise ValueError(f"unsupported ledger database {self.dialect!r} (use sqlite or postgresql)")
        return insert

    def costs(self, request_ids: Iterable[str]) -> dict[str, int]:
        """cost_nanousd by request id, for the ids that are in the ledger. An id that no row can hold (longer than
        the column, or with a NUL, which PostgreSQL's text refuses) is not looked for: it is not in the ledger."""
        self.ensure_schema()
        t = charges_table
        longest = t.c.request_id.type.length
        ids = [i for i in dict.fromkeys(request_ids) if len(i) <= longest and "\x00" not in i]
        found: dict[str, int] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), _LOOKUP_CHUNK_IDS):
                chunk = ids[i : i + _LOOKUP_CHUNK_IDS]
                stmt = select(t.c.request_id, t.c.cost_nanousd).where(t.c.request_id.in_(chunk))
                found.update((r[0], int(r[1])) for r in conn.execute(stmt))
        return found

    def charges(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        *,
        account: str | None = None,
        limit: int | None = None,
    ) -> list[Charge]:
        """The raw charges with since <= started_at < until, oldest first."""
        self.ensure_schema()
        t = charges_table
        stmt = _filtered(select(t), since, until, account).order_by(t.c.started_at, t.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [row_to_charge(r) for r in conn.execute(stmt)]

    def grouped_usage(
        self, since: dt.datetime | None, until: dt.datetime | None, *, account: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests, billed compute and cost summed per account, model, task, profile and UTC day."""
        self.ensure_schema()
        t = charges_table
        keys = (t.c.billed_account, t.c.model_id, t.c.task, t.c.hardware_profile, t.c.day)
        stmt = select(
            *keys,
            func.count().label("requests"),
            func.sum(t.c.compute_ms).label("compute_ms"),
            func.sum(t.c.cost_nanousd).label("cost_nanousd"),
        )
        stmt = _filtered(stmt, since, until, account).group_by(*keys).order_by(t.c.day, *keys[:4])
        with self.engine.connect() as conn:
            return [
                {
                    "account": r.billed_account,
                    "model_id": r.model_id,
                    "task": r.task,
                    "hardware_profile": r.hardware_profile,
                    "day": r.day if isinstance(r.day, dt.date) else dt.date.fromisoformat(str(r.day)),
                    "requests": int(r.requests),
                    "compute_ms": int(r.compute_ms),
                    "cost_nanousd": int(r.cost_nanousd),
                }
                for r in conn.execute(stmt)
            ]

    def add_dead_letters(self, consumer: str, letters: Sequence[tuple[dict[str, Any], str]]) -> int:
        """Keep each (record, error) refused for good, in one transaction; return how many were new.

        A record already kept for this consumer (the same JSON) is not added again, so the retry of a batch whose
        offset could not be committed does not bury its records twice. Raises when the database cannot be
        written (the caller retries later: nothing is lost)."""
        self.ensure_schema()
        if not letters:
            return 0
        now = dt.datetime.now(dt.timezone.utc)
        t = dead_letters_table
        name = safe_text(consumer)
        added = 0
        with self.engine.begin() as conn:
            for record, error in letters:
                text = record_json(record)
                rid = record.get("request_id") if isinstance(record, dict) else None
                request_id = None if rid is None else safe_text(str(rid))
                known = select(t.c.id).where(t.c.consumer == name, t.c.record == text).limit(1)
                if conn.execute(known).first() is not None:
                    continue
                row = {
                    "request_id": request_id,
                    "consumer": name,
                    "error": safe_text(error)[:DEAD_LETTER_ERROR_CHARS],
                    "record": text,
                    "dead_at": now,
                }
                conn.execute(t.insert(), row)
                added += 1
        return added

    def dead_letters(self, *, consumer: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The records refused for good, oldest first: id, consumer, request_id, error, dead_at (ISO), record."""
        import json

        self.ensure_schema()
        t = dead_letters_table
        stmt = select(t).order_by(t.c.id)
        if consumer is not None:
            stmt = stmt.where(t.c.consumer == consumer)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [
                {
                    "id": int(r.id),
                    "consumer": r.consumer,
                    "request_id": r.request_id,
                    "error": r.error,
                    "dead_at": r.dead_at.isoformat().replace("+00:00", "Z"),
                    "record": json.loads(r.record),
                }
                for r in conn.execute(stmt)
            ]

    def count(self) -> int:
        """How many charges the ledger holds."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(charges_table)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def _filtered(stmt: Any, since: dt.datetime | None, until: dt.datetime | None, account: str | None) -> Any:
    t = charges_table
    if since is not None:
        stmt = stmt.where(t.c.started_at >= since)
    if until is not None:
        stmt = stmt.where(t.c.started_at < until)
    if account is not None:
        stmt = stmt.where(t.c.billed_account == account)
    return stmt


# PostgreSQL's SQLSTATEs of a refused value: class 22 (data exception: too long, out of range, bad encoding) and
# 23 (integrity: NOT NULL, CHECK), and a parameter of the wrong type for its column (42804).
_DATA_SQLSTATE_CLASSES = ("22", "23")
_DATA_SQLSTATES = frozenset({"42804"})


def is_data_error(err: BaseException) -> bool:
    """True when `err` says the database refused the values of an insert, so retrying the same rows cannot help.

    Yes: IntegrityError, DataError, a driver that could not bind a value (psycopg's client-side
    ProgrammingError, sqlite3's, an OverflowError), an UnstorableCharge, a parameter of the wrong type. No (so
    the batch is retried with back-off): a lost or refused connection (OperationalError, InterfaceError),
    missing privileges or tables, and anything else, which are about the database, not about one record."""
    if isinstance(err, (UnstorableCharge, OverflowError)):
        return True
    if isinstance(err, DBAPIError):
        if err.connection_invalidated:
            return False
        sqlstate = getattr(err.orig, "sqlstate", None)
        if isinstance(err, (IntegrityError, DataError)):
            return True
        if isinstance(err, ProgrammingError):
            # No SQLSTATE: the driver refused to bind a value before sending it. With one: a statement the
            # server refused (class 42: privileges, a missing table), not this row, but for a type mismatch.
            return sqlstate is None or sqlstate in _DATA_SQLSTATES
        return isinstance(sqlstate, str) and sqlstate[:2] in _DATA_SQLSTATE_CLASSES
    # SQLAlchemy's own refusal of a parameter (a bind processor failed), raised before the driver is called.
    return isinstance(err, StatementError)


def record_json(record: Any) -> str:
    """The record as ASCII JSON text (sorted keys; anything not JSON as its str): storable in any text column."""
    import json

    return json.dumps(record, sort_keys=True, default=str, ensure_ascii=True)


def safe_text(value: str) -> str:
    """`value` with what PostgreSQL's text refuses escaped: NUL characters and unpaired surrogates."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
