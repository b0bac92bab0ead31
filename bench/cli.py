"""`hfi bench`: load-test an hf-inference endpoint, reconcile its charges, save and compare runs.

`hfi bench URL --model ID --task TASK [options]` runs a benchmark (the same as `hfi bench run URL ...`);
`hfi bench compare A.json B.json` prints a table of ratios. Heavy imports stay inside the commands.
"""

from __future__ import annotations

import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

_SUBCOMMANDS = ("run", "compare")


class _BenchGroup(TyperGroup):
    """A group whose default command is `run`: `hfi bench URL ...` means `hfi bench run URL ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_BenchGroup,
    no_args_is_help=True,
    help="Load-test an hf-inference endpoint (`hfi bench URL --model ID --task TASK`); compare runs.",
)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the `hfi` app."""
    app.add_typer(bench_app, name="bench")


def _levels(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(
            "a comma-separated list of numbers, e.g. 1,2,4,8", param_hint="--sweep"
        ) from err
    if not levels or any(not lv > 0 for lv in levels):
        raise typer.BadParameter("levels must be positive", param_hint="--sweep")
    return levels


def _price(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation as err:
        raise typer.BadParameter("an exact decimal, e.g. 0.00125", param_hint="--price-per-second") from err
    if not value.is_finite() or value < 0:
        raise typer.BadParameter("must be a non-negative number", param_hint="--price-per-second")
    return value


@bench_app.command("run")
def run_command(
    url: str = typer.Argument(..., help="the endpoint's base URL, e.g. http://127.0.0.1:8000"),
    model: str = typer.Option(
        ..., "--model", "-m", help="model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    task: str = typer.Option(
        ...,
        "--task",
        "-t",
        help="text-to-image, chat, text-generation, feature-extraction, sentence-similarity, "
        "text-classification",
    ),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="closed loop: clients in flight"),
    rate: float | None = typer.Option(None, "--rate", "-r", help="open loop: Poisson arrivals per second"),
    requests: int | None = typer.Option(None, "--requests", "-n", min=1, help="measured requests per level"),
    duration: float | None = typer.Option(None, "--duration", "-d", help="measured seconds per level"),
    warmup: int = typer.Option(2, "--warmup", min=0, help="requests sent first and not counted"),
    sweep: str | None = typer.Option(
        None, "--sweep", help="levels of concurrency (or rate with --rate): 1,2,4"
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="sent as Authorization: Bearer"
    ),
    workload_file: Path | None = typer.Option(None, "--workload", "-w", help="a JSONL file of items"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="chat and generation"),
    width: int | None = typer.Option(None, "--width", help="text-to-image"),
    height: int | None = typer.Option(None, "--height", help="text-to-image"),
    steps: int | None = typer.Option(None, "--steps", help="text-to-image num_inference_steps"),
    seed: int = typer.Option(0, "--seed", help="seeds the arrivals and the requests"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="chat and generation"),
    chat_route: str = typer.Option(
        "openai", "--chat-route", help="openai (/v1/...) or model (/models/ID/v1/...)"
    ),
    timeout: float = typer.Option(120.0, "--timeout", help="per-request timeout, seconds"),
    max_in_flight: int = typer.Option(1024, "--max-in-flight", min=1, help="open loop: client-side cap"),
    price_per_second: str | None = typer.Option(
        None, "--price-per-second", help="USD per compute second, for responses without a cost header"
    ),
    replicas: int = typer.Option(1, "--replicas", min=1, help="replicas serving the model (for utilisation)"),
    ledger: str | None = typer.Option(None, "--ledger", help="reconcile against this ledger DATABASE_URL"),
    ledger_table: str | None = typer.Option(
        None,
        "--ledger-table",
        help="read this table (request_id, cost_nanousd, compute_ms) instead of metering's",
    ),
    billing_endpoint: str | None = typer.Option(
        None, "--billing-endpoint", help="reconcile against the provider cost look-up URL instead"
    ),
    billing_token: str | None = typer.Option(None, "--billing-token", help="bearer token of the look-up"),
    ledger_wait: float = typer.Option(10.0, "--ledger-wait", help="seconds to wait for late charges"),
    output: Path | None = typer.Option(None, "--output", "-o", help="save the run as JSON (+ .csv, .png)"),
    csv_path: Path | None = typer.Option(None, "--csv", help="CSV path (default: beside --output)"),
    plot_path: Path | None = typer.Option(None, "--plot", help="PNG path (default: beside --output)"),
    no_plot: bool = typer.Option(False, "--no-plot", help="do not draw the PNG"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run a benchmark against URL and print the report."""
    from bench.reconcile import format_reconciliation
    from bench.report import format_run
    from bench.runner import CLOSED, OPEN, LoadError, LoadSpec
    from bench.session import BenchPlan, LiveProgress, run_plan
    from bench.workloads import WorkloadError, WorkloadParams, builtin_workload, load_jsonl

    if chat_route not in ("openai", "model"):
        raise typer.BadParameter("openai or model", param_hint="--chat-route")
    params = WorkloadParams(
        max_tokens=max_tokens,
        width=width,
        height=height,
        num_inference_steps=steps,
        seed=seed,
        stream=stream,
        chat_route=chat_route,
    )
    try:
        workload = (
            load_jsonl(workload_file, task, model, params)
            if workload_file
            else builtin_workload(task, model, params)
        )
        load = LoadSpec(
            mode=OPEN if rate is not None else CLOSED,
            concurrency=concurrency,
            rate_rps=rate,
            requests=requests if requests is not None or duration is not None else 100,
            duration_s=duration,
            warmup_requests=warmup,
            timeout_s=timeout,
            seed=seed,
            max_in_flight=max_in_flight,
        )
    except (WorkloadError, LoadError) as err:
        raise typer.BadParameter(str(err)) from err
    source, source_name = _charge_source(ledger, ledger_table, billing_endpoint, billing_token)
    plan = BenchPlan(
        url=url,
        workload=workload,
        load=load,
        sweep=_levels(sweep),
        token=token,
        price_usd_per_second=_price(price_per_second),
        replicas=replicas,
        ledger=source,
        ledger_name=source_name,
        ledger_wait_s=ledger_wait,
    )
    show_progress = not quiet and sys.stderr.isatty()
    doc, ledger_error = run_plan(
        plan, progress=LiveProgress(show_progress), log=lambda m: typer.echo(m, err=True)
    )
    typer.echo(format_run(doc))
    _save(doc, output, csv_path, plot_path, no_plot)
    if ledger_error:
        typer.echo(f"error: reconciliation failed: {ledger_error}", err=True)
        raise typer.Exit(2)
    if doc["reconciliation"] is not None:
        typer.echo("\n".join(format_reconciliation(doc["reconciliation"])))
        if not doc["reconciliation"]["ok"]:
            raise typer.Exit(1)
    if not any(p["summary"]["ok"] for p in doc["points"]):
        typer.echo("error: no request succeeded", err=True)
        raise typer.Exit(1)


def _charge_source(ledger: str | None, table: str | None, endpoint: str | None, endpoint_token: str | None):
    """The reconciliation source the options name (checked now, so a bad URL fails before the load)."""
    from bench.reconcile import BillingEndpoint, LedgerError, LedgerLayout, SqlLedger

    if ledger and endpoint:
        raise typer.BadParameter("give --ledger or --billing-endpoint, not both", param_hint="--ledger")
    if ledger:
        source, name = SqlLedger(ledger, LedgerLayout(table=table) if table else None), _redact(ledger)
    elif endpoint:
        return BillingEndpoint(endpoint, token=endpoint_token), endpoint
    else:
        return None, ""
    try:
        note = source.check()  # a bad URL, an unreachable database or a missing custom table fails here
    except LedgerError as err:
        raise typer.BadParameter(str(err), param_hint="--ledger") from err
    if note:
        typer.echo(f"note: {note}", err=True)
    return source, name


def _save(
    doc: dict, output: Path | None, csv_path: Path | None, plot_path: Path | None, no_plot: bool
) -> None:
    from bench.output import save_csv, save_json, save_plot

    saved: list[Path] = []
    if output is not None:
        saved += [save_json(doc, output), save_csv(doc, csv_path or output.with_suffix(".csv"))]
    elif csv_path is not None:
        saved.append(save_csv(doc, csv_path))
    if not no_plot and (output is not None or plot_path is not None):
        saved.append(save_plot(doc, plot_path or output.with_suffix(".png")))  # type: ignore[union-attr]
    if saved:
        typer.echo("saved " + ", ".join(str(p) for p in saved))


def _redact(database_url: str) -> str:
    """The URL without its password, for the report."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(database_url).render_as_string(hide_password=True)
    except Exception:
        return database_url.split("@")[-1]


@bench_app.command("compare")
def compare_command(
    a: Path = typer.Argument(..., help="the baseline run (JSON)"),
    b: Path = typer.Argument(..., help="the run compared to it (JSON)"),
) -> None:
    """Print a table of B / A ratios for every metric and load level both runs measured."""
    from bench.compare import format_table
    from bench.output import RunFileError, read_run

    try:
        doc_a, doc_b = read_run(a), read_run(b)
    except RunFileError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(format_table(doc_a, doc_b, name_a=str(a), name_b=str(b)))
