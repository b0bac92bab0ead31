"""`hfi usage`, `hfi profiles`, `hfi metering dead-letters` and `hfi metering drain`: usage reports from the
ledger, the hardware profiles with their prices, the spooled records that the ledger or a sink refused for good,
and the delivery of the spool files a pod's stopped processes left (its preStop hook).

Imports stay inside the commands so that `hfi --help` stays fast.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.settings import ENV_VARS
from core.utc import as_utc

if TYPE_CHECKING:
    from pathlib import Path

    import typer

    from metering.config import MeteringSettings
    from metering.spool import Spool

# The environment variables of the metering settings, as the service reads them (core.settings.ENV_VARS), name ->
# field: the drain reads all but the provider secret, which only the billing endpoint needs.
METERING_ENV_VARS = {
    name: path.removeprefix("metering.")
    for name, (path, _) in ENV_VARS.items()
    if path.startswith("metering.") and name != "HFI_PROVIDER_SECRET"
}


def parse_when(value: str | None, *, end: bool = False) -> dt.datetime | None:
    """An ISO date (midnight UTC; with `end`, the next midnight so the day is included) or datetime (UTC)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
            return start + dt.timedelta(days=1) if end else start
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO date or datetime: {value!r}") from None
    return as_utc(when)


def month_start(now: dt.datetime | None = None) -> dt.datetime:
    """Midnight UTC on the first day of the current month."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return dt.datetime(now.year, now.month, 1, tzinfo=dt.timezone.utc)


def resolve_database_url(option: str | None) -> str:
    """--database-url, else $HFI_DATABASE_URL, else the MeteringSettings default."""
    from core.db import expand_sqlite_url
    from core.settings import setting
    from metering.config import DEFAULT_DATABASE_URL

    url = setting("metering.database_url", option, default=DEFAULT_DATABASE_URL, config_file=False)
    return expand_sqlite_url(url)


def usage_text(
    database_url: str,
    *,
    account: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    fmt: str,
    charges: bool,
) -> str:
    """The report (or the raw charges) read from the ledger at `database_url`, rendered in `fmt`."""
    from metering.ledger import Ledger
    from metering.reports import UsageReport, UsageRow, render_charges, render_report

    ledger = Ledger(database_url)
    try:
        if charges:
            return render_charges(ledger.charges(since, until, account=account), fmt)
        rows = [UsageRow(**g) for g in ledger.grouped_usage(since, until, account=account)]
        return render_report(UsageReport(since, until, account, rows), fmt)
    finally:
        ledger.close()


def dead_letters_list(
    database_url: str, spool_dir: str, *, consumer: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The dead letters: the ledger's (table `metering_dead_letters`, each with its `id`), then the sinks'
    (`<spool_dir>/dead-letter/*.jsonl`, each with its `file`), oldest first in each."""
    from metering.drain import read_dead_letter_files
    from metering.ledger import Ledger

    ledger = Ledger(database_url)
    try:
        letters = ledger.dead_letters(consumer=consumer, limit=limit)
    finally:
        ledger.close()
    in_files = [d for d in read_dead_letter_files(spool_dir) if consumer in (None, d.get("consumer"))]
    return letters + in_files[: None if limit is None else max(0, limit - len(letters))]


def profiles_rows(profiles_dir: str | None, on: dt.date | None = None) -> list[dict[str, Any]]:
    """One row per hardware profile: accelerator, CPUs, memory and the price in force on `on` (today)."""
    from hardware_profiles import load_profiles
    from metering.pricing import usd_per_hour_str

    on = on or dt.datetime.now(dt.timezone.utc).date()
    catalog = load_profiles(profiles_dir)
    rows = []
    for name in catalog.names():
        p = catalog.get(name)
        acc = p.accelerator
        try:
            point = p.price_at(on)
            usd_h, since = usd_per_hour_str(point), point.effective_from.isoformat()
        except LookupError:
            usd_h, since = "-", "-"
        later = [pp.effective_from.isoformat() for pp in p.prices if pp.effective_from > on]
        rows.append(
            {
                "name": name,
                "accelerator": f"{acc.count:g}x {acc.type}" if acc else "cpu",
                "gpu_memory_gb": f"{acc.memory_gb:g}" if acc and acc.memory_gb else "-",
                "cpus": f"{p.cpus:g}",
                "memory_gb": f"{p.memory_gb:g}" if p.memory_gb else "-",
                "usd_per_hour": usd_h,
                "price_since": since,
                "next_price_change": later[0] if later else "-",
            }
        )
    return rows


def drain_settings(
    spool_dir: str | None, database_url: str | None, env: Mapping[str, str] | None = None
) -> MeteringSettings:
    """The service's metering settings as its processes read them (HFI_CONFIG's `metering`, then the
    environment), with --spool-dir and --database-url over them. The drain must feed the same ledger and
    sinks: a spool file is deleted once every consumer it is drained for is past its end."""
    from core.settings import settings_data
    from metering.config import MeteringSettings

    options = {k: v for k, v in (("spool_dir", spool_dir), ("database_url", database_url)) if v}
    data = settings_data({"metering": options}, env=env, variables=METERING_ENV_VARS, secret_files=False)
    return MeteringSettings.model_validate(data.get("metering") or {})


@dataclass
class DrainResult:
    """What `drain_spool` did."""

    adopted_files: int  # spool files of processes that were gone (and the ones that went during the drain)
    delivered: int  # charges that went to the ledger (or its dead-letter table)
    left_bytes: int  # undelivered bytes: their files stay for the next process on this volume to adopt
    held_files: list[str] = field(default_factory=list)  # this host's files still locked by a live process

    @property
    def complete(self) -> bool:
        return self.left_bytes == 0 and not self.held_files

    def summary(self) -> str:
        """One line for the operator (a preStop hook's output shows in the pod's events when it fails)."""
        line = f"metering drain: {self.delivered} charges delivered from {self.adopted_files} spool files"
        if self.left_bytes:
            line += f"; {self.left_bytes} bytes undelivered, left in the spool for the next process to adopt"
        if self.held_files:
            line += f"; still held by a live process: {', '.join(self.held_files)}"
        return line


def drain_spool(settings: MeteringSettings, timeout_s: float, *, poll_s: float = 0.5) -> DrainResult:
    """Deliver every spool file in the spool directory whose process is gone to the ledger and the sinks,
    for at most `timeout_s`; a pod's preStop hook, after its Ray processes were stopped.

    Files still locked belong to live processes. Those of this host (named after it: a pod's host name is the
    pod's) are waited for, as its processes are stopping; other hosts' (pods sharing a node's hostPath) are
    left to their owners. What cannot be delivered in time stays in the directory, whole, for the next
    process there to adopt (at its start, or periodically: `metering.adopt_interval_s`).

    While a node drainer runs there (`--follow`, the chart's sidecar), it delivers them: this waits, up to
    `timeout_s`, until it has (this host's files are gone), and does the work itself if the drainer stops."""
    from hardware_profiles.schema import ProfileCatalog
    from metering.service import MeteringService
    from metering.spool import drainer_consumers

    deadline = time.monotonic() + timeout_s
    directory = settings.resolved_spool_dir()
    while directory.is_dir() and drainer_consumers(directory) is not None:
        mine = [p.name for p in _this_host_files(directory)]
        if not mine:
            return DrainResult(0, 0, 0)
        if time.monotonic() >= deadline:
            return DrainResult(0, 0, 0, mine)
        time.sleep(min(poll_s, 0.2))
    timeout_s = max(0.0, deadline - time.monotonic())

    retry_max_s = min(settings.retry_max_s, 2.0)  # the database may come back within the grace period
    settings = settings.model_copy(
        update={
            "enabled": True,
            "adopt_interval_s": 0.0,  # adopted here, between flushes
            "close_timeout_s": 0.0,
            "drain_interval_s": min(settings.drain_interval_s, poll_s),
            "retry_initial_s": min(settings.retry_initial_s, retry_max_s),
            "retry_max_s": retry_max_s,
        }
    )
    deadline = time.monotonic() + timeout_s
    svc = MeteringService(settings, ProfileCatalog(profiles={}))  # charges are priced already: no prices
    spool: Spool = svc.spool  # type: ignore[assignment]
    adopted = len(spool.files()) - 1  # all but its own (empty) file, deleted at close
    try:
        while True:
            adopted += spool.adopt_orphans()
            left = sum(spool.pending(c.name) for c in svc.consumers)
            held = _held_by_this_host(spool)
            remaining = deadline - time.monotonic()
            if (left == 0 and not held) or remaining <= 0:
                break
            svc.flush(min(poll_s, remaining))
        ledger = svc.consumers[0]
        delivered = ledger.delivered_records + ledger.dead_lettered_records
    finally:
        svc.close()
    return DrainResult(adopted, delivered, left, held)


def _held_by_this_host(spool: Spool) -> list[str]:
    """This host's spool files that another process still holds (spool files are named `<host>-<pid>-...`)."""
    ours = set(spool.files())
    return [p.name for p in _this_host_files(spool.directory) if p not in ours]


def _this_host_files(directory: Path) -> list[Path]:
    """The spool files of this host's processes in `directory` (they are named `<host>-<pid>-...`), sorted."""
    return sorted(directory.glob(socket.gethostname() + "-*.jsonl"))


def register(app: typer.Typer) -> None:
    """Add `usage`, `profiles`, `metering dead-letters` and `metering drain` to the `hfi` command line."""
    import typer

    _register_dead_letters(app)

    @app.command("usage")
    def usage(
        account: str | None = typer.Option(None, "--account", help="only this billed account"),
        since: str | None = typer.Option(
            None, "--since", help="ISO date or datetime, UTC, inclusive (default: start of this month)"
        ),
        until: str | None = typer.Option(
            None, "--until", help="ISO date (inclusive) or datetime (exclusive)"
        ),
        fmt: str = typer.Option("table", "--format", help="table, json or csv"),
        charges: bool = typer.Option(False, "--charges", help="the raw charges, one per request"),
        database_url: str | None = typer.Option(
            None,
            "--database-url",
            help="the ledger (default: $HFI_DATABASE_URL, then the local SQLite ledger)",
        ),
    ) -> None:
        """Usage per account, model, task, hardware profile and day, with exact USD totals."""
        if fmt not in ("table", "json", "csv"):
            raise typer.BadParameter("use table, json or csv", param_hint="--format")
        try:
            since_dt = parse_when(since) if since else month_start()
            until_dt = parse_when(until, end=True)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        url = resolve_database_url(database_url)
        typer.echo(usage_text(url, account=account, since=since_dt, until=until_dt, fmt=fmt, charges=charges))

    @app.command("profiles")
    def profiles(
        profiles_dir: str | None = typer.Option(
            None, "--profiles-dir", help="a directory of profile YAML files (default: the packaged catalog)"
        ),
        fmt: str = typer.Option("table", "--format", help="table or json"),
    ) -> None:
        """The hardware profiles: accelerator, CPUs, memory and the price in force today."""
        import json

        from core.settings import setting
        from hardware_profiles.loader import ProfileError

        try:
            rows = profiles_rows(setting("profiles_dir", profiles_dir, config_file=False))
        except ProfileError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(2) from None
        if fmt == "json":
            typer.echo(json.dumps(rows, indent=2))
            return
        columns = list(rows[0])
        widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
        typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for r in rows:
            typer.echo("  ".join(r[c].ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())


def _register_dead_letters(app: typer.Typer) -> None:
    """Add the `metering` group: `dead-letters` and `drain`."""
    import typer

    metering = typer.Typer(
        no_args_is_help=True, help="The metering pipeline: records refused for good, a stopped pod's spool."
    )
    app.add_typer(metering, name="metering")
    _register_drain(metering)

    @metering.command("dead-letters")
    def dead_letters(
        consumer: str | None = typer.Option(None, "--consumer", help="only this consumer (ledger, a sink)"),
        limit: int | None = typer.Option(None, "--limit", min=0, help="at most this many"),
        database_url: str | None = typer.Option(
            None,
            "--database-url",
            help="the ledger (default: $HFI_DATABASE_URL, then the local SQLite ledger)",
        ),
        spool_dir: str | None = typer.Option(
            None, "--spool-dir", help="the spool directory (default: $HFI_SPOOL_DIR, then the local one)"
        ),
    ) -> None:
        """Spooled charges the ledger or a usage-event sink refused for good, as JSON (oldest first)."""
        import json

        from sqlalchemy.exc import OperationalError

        from core.settings import setting
        from metering.config import MeteringSettings

        spool = setting(
            "metering.spool_dir", spool_dir, default=MeteringSettings().spool_dir, config_file=False
        )
        try:
            rows = dead_letters_list(
                resolve_database_url(database_url), spool, consumer=consumer, limit=limit
            )
        except OperationalError as err:
            typer.echo(f"cannot read the ledger database: {err.orig}", err=True)
            raise typer.Exit(1) from None
        typer.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))


def _register_drain(metering: typer.Typer) -> None:
    """Add `metering drain`."""
    import typer

    @metering.command("drain")
    def drain(
        spool_dir: str | None = typer.Option(
            None, "--spool-dir", help="the spool directory (default: $HFI_SPOOL_DIR, then the local one)"
        ),
        database_url: str | None = typer.Option(
            None,
            "--database-url",
            help="the ledger (default: $HFI_DATABASE_URL, then the local SQLite ledger)",
        ),
        timeout_s: float = typer.Option(60.0, "--timeout-s", min=0, help="give up after this many seconds"),
        follow: bool = typer.Option(
            False,
            "--follow",
            help="run as the directory's node drainer until SIGTERM, then deliver what is left within --timeout-s",
        ),
    ) -> None:
        """Deliver the spool files of stopped processes to the ledger (a pod's preStop hook, after `ray stop`).

        Files that a process of this host still holds are waited for, up to --timeout-s. Exit status 1 when
        charges are left: they stay in the spool directory for the next process there.

        With --follow: the node drainer (a pod's sidecar). It delivers every spool file in the directory, those
        of live serving processes too, which then leave their charges to it; on SIGTERM or Ctrl-C it delivers
        what is left within --timeout-s and exits."""
        settings = drain_settings(spool_dir, database_url)
        if follow:
            import signal

            from metering import node_drain

            stop = node_drain.stop_on(signal.SIGTERM, signal.SIGINT)
            node_drain.yield_cpu(settings)
            if not node_drain.run(settings, stop, finish_timeout_s=timeout_s):
                raise typer.Exit(1)
            return
        result = drain_spool(settings, timeout_s)
        typer.echo(result.summary())
        if not result.complete:
            raise typer.Exit(1)
