"""`hfi status`: the running service at a glance (GET /admin/status, serving/runtime_status.py), as a table.

It reads the service over HTTP: by default the one this machine's settings describe (host and port, the
operator's HFI_ADMIN_TOKEN), or another with `--url` and `--token`. `--watch` redraws it every few seconds;
`--json` prints the status document for scripts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

DEFAULT_WATCH_S = 2.0


class StatusError(Exception):
    """The status could not be read: the message says why and what to do."""


def fetch_status(url: str, token: str | None, timeout_s: float = 30.0) -> dict[str, Any]:
    """GET {url}/admin/status with the admin token; StatusError with a readable message otherwise."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url.rstrip("/") + "/admin/status", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise StatusError(f"cannot reach the service at {url}: {err}") from None
    if r.status_code == 200:
        return r.json()
    try:
        detail = r.json().get("error", r.text)
    except ValueError:
        detail = r.text
    hint = ""
    if r.status_code in (401, 403):
        hint = " (give an admin token: --token, or HFI_ADMIN_TOKEN as the service has it)"
    raise StatusError(f"{url} answered {r.status_code}: {detail}{hint}")


def _num(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value}{suffix}"


def render(status: dict[str, Any]) -> Any:
    """The status as a rich renderable: the models' table, then spend, ledger and billing."""
    from rich.console import Group
    from rich.table import Table

    models = Table(
        title=f"Models (requests/s and p50 over the last {int(status['window_s'])} s)",
        caption="replicas: running/starting/target",
    )
    for name, justify in (
        ("model", "left"),
        ("replicas", "right"),
        ("in flight", "right"),
        ("queue", "right"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("errors", "right"),
        ("profile", "left"),
        ("$/hour", "right"),
    ):
        models.add_column(name, justify=justify, no_wrap=name in ("model", "profile"))  # type: ignore[arg-type]
    for m in status["models"]:
        r = m["replicas"]
        models.add_row(
            m["model_id"],
            f"{r['running']}/{r['starting']}/{r['target']}",
            _num(m["in_flight"]),
            _num(m["queue"]),
            f"{m['requests_per_s']:.2f}",
            _num(m["p50_ms"]),
            str(m["errors_last_minute"]),
            m["hardware_profile"],
            m["price"]["usd_per_hour"],
        )
    summary = Table(show_header=False, title="Service")
    summary.add_column("what")
    summary.add_column("value")
    spend = status["spend"]
    if "error" in spend:
        summary.add_row("spend", f"unavailable: {spend['error']}")
    else:
        summary.add_row("spend today (UTC)", f"${spend['today_usd']} ({spend['today_requests']} requests)")
        summary.add_row(
            f"spend {spend['month']}", f"${spend['month_usd']} ({spend['month_requests']} requests)"
        )
    ledger = status["ledger"]
    summary.add_row(
        "spool backlog",
        f"{ledger['pending_charges']} charges, {ledger['pending_bytes']} bytes"
        + ("" if ledger.get("metering_enabled", True) else " (metering off)"),
    )
    summary.add_row("drain lag", f"{ledger['drain_lag_s']:.1f} s")
    if ledger.get("unspooled_charges"):
        summary.add_row(
            "NOT ON DISK",
            f"{ledger['unspooled_charges']} charges held in memory: the spool cannot write (see the log)",
        )
    if ledger.get("node_drainer_processes"):
        summary.add_row(
            "delivered by",
            f"the node drainer, for {ledger['node_drainer_processes']} of {status['processes']} processes",
        )
    billing = status["billing"]
    summary.add_row(
        "billing mode",
        billing["mode"] + (" + Hugging Face tokens" if billing.get("accept_hf_tokens") else ""),
    )
    router = status.get("router")
    if router:
        summary.add_row("router replicas", f"{router['running']}/{router['starting']}/{router['target']}")
    summary.add_row("source", f"{status['source']}, {status['processes']} processes, {status['time']}")
    return Group(models, summary)


def _target(url: str | None, token: str | None, config: Path | None) -> tuple[str, str | None]:
    """The URL and token to use: the options, else this machine's settings (host, port, HFI_ADMIN_TOKEN)."""
    if url and token:
        return url, token
    from core.settings import SettingsError
    from serving.config import Settings

    if config:
        os.environ["HFI_CONFIG"] = str(config)
    try:
        settings = Settings.load({})
    except SettingsError as err:
        if url:
            return url, token
        raise StatusError(f"cannot read the settings: {err}") from None
    if not url:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    return url, token or settings.billing.admin_token


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status(
        url: str | None = typer.Option(
            None, help="the service's base URL (default: this machine's settings)"
        ),
        token: str | None = typer.Option(
            None, envvar="HFI_STATUS_TOKEN", help="an admin token (default: HFI_ADMIN_TOKEN)"
        ),
        watch: bool = typer.Option(False, "--watch", help="redraw every --interval seconds until Ctrl-C"),
        interval: float = typer.Option(DEFAULT_WATCH_S, min=0.5, help="seconds between redraws with --watch"),
        as_json: bool = typer.Option(False, "--json", help="print the status document as JSON"),
        config: Path | None = typer.Option(None, help="a settings YAML file (HFI_CONFIG)"),
    ) -> None:
        """Models (replicas, in flight, queue, req/s, p50, profile, price), spend, spool backlog, billing mode."""
        from rich.console import Console

        console = Console()
        try:
            base, admin = _target(url, token, config)
            if not watch:
                doc = fetch_status(base, admin)
                if as_json:
                    typer.echo(json.dumps(doc, indent=2))
                else:
                    console.print(render(doc))
                return
            _watch(console, base, admin, interval, as_json)
        except StatusError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None


def _watch(console: Any, base: str, token: str | None, interval: float, as_json: bool) -> None:
    from rich.live import Live
    from rich.text import Text

    try:
        if as_json:  # one JSON document per line, for a script that follows it
            while True:
                typer.echo(json.dumps(fetch_status(base, token)))
                time.sleep(interval)
        with Live(Text("reading the status..."), console=console, auto_refresh=False) as live:
            while True:
                try:
                    live.update(render(fetch_status(base, token)), refresh=True)
                except StatusError as err:  # the service restarting: say so and keep watching
                    live.update(Text(f"error: {err}"), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
