"""`hfi serve`, `hfi prepare`, `hfi catalog`: run the service and look at what it serves."""

from __future__ import annotations

from pathlib import Path

import typer

READY = "Ready: {url} ({loaded} in {seconds:.1f} s). Ctrl-C stops it."

USAGE = """
  Python:  from huggingface_hub import InferenceClient
           InferenceClient(base_url="{url}/models/local/tiny-flux").text_to_image("a cat", seed=1).save("cat.png")
           InferenceClient(base_url="{url}/v1").chat_completion(
               model="HuggingFaceTB/SmolLM2-135M-Instruct",
               messages=[{{"role": "user", "content": "Hello!"}}])
  OpenAI:  OpenAI(base_url="{url}/v1", api_key="-").chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", ...)
  curl:    curl {url}/models/sentence-transformers/all-MiniLM-L6-v2 -d '{{"inputs": "hello"}}'

Models: {models}
"""


def _settings_args(config: Path | None, host: str | None, port: int | None, catalog: Path | None) -> dict:
    import os

    if config:
        os.environ["HFI_CONFIG"] = str(config)
    args: dict = {}
    if host:
        args["host"] = host
    if port:
        args["port"] = port
    if catalog:
        args["catalog_file"] = str(catalog)
    return args


def _load(args: dict):
    """Settings with the catalog and profiles validated, or exit 2 with the message naming the field."""
    from core.settings import SettingsError
    from serving.config import Settings

    try:
        settings = Settings.load(args)
        catalog, profiles = settings.validated()
    except SettingsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    return settings, catalog, profiles


def unwritable_directories(settings) -> list[str]:
    """What `hfi serve` must be able to write and cannot, each naming its setting: the spool (every charge is
    written there before its response: without it no request could be answered) and a SQLite ledger's
    directory. Checked before Ray starts, so a wrong path is one line, not a replica that fails to start."""
    import tempfile

    from sqlalchemy.engine import make_url

    wanted: list[tuple[str, Path]] = []
    if settings.metering.enabled:
        wanted.append(("metering.spool_dir", settings.metering.resolved_spool_dir()))
    url = make_url(settings.metering.resolved_database_url())
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        wanted.append(("metering.database_url", Path(url.database).parent))
    problems = []
    for setting, directory in wanted:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".hfi-write-check-"):
                pass
        except OSError as err:
            problems.append(f"{setting}: {directory} cannot be written ({err.strerror or err})")
    return problems


def _first_start_tokens(settings) -> None:
    """In tokens mode, create an admin and a first user on the first start and print their tokens once."""
    if settings.billing.mode != "tokens":
        return
    from billing.cli import bootstrap
    from billing.errors import AccountsUnavailable

    try:
        tokens = bootstrap(settings.metering.resolved_database_url(), settings.billing)
    except AccountsUnavailable:  # serve anyway: admission answers 503 until the database is back
        typer.echo(
            "warning: the database cannot be reached, so no first-start tokens were made; requests get 503 "
            "until it is back (then `hfi accounts create-user` and `hfi accounts issue-token` make tokens).",
            err=True,
        )
        return
    if tokens is not None:  # stored hashed: shown this once
        typer.echo(f"First start: admin token {tokens[0]}\n             user token  {tokens[1]}")
        typer.echo("Keep them: they are not shown again (`hfi accounts issue-token` makes more).")


def _loaded(catalog) -> str:
    """What the ready line says is up: the models loaded now, and those that load on their first request."""
    models = catalog.models
    later = [m for m in models if m.scales_to_zero or m.pool is not None]
    said = f"{len(models) - len(later)} models loaded"
    return f"{said}, {len(later)} load on their first request" if later else said


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path | None = typer.Option(None, help="a settings YAML file (HFI_CONFIG)"),
        host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
        port: int | None = typer.Option(None, help="HTTP port (default 8000)"),
        catalog: Path | None = typer.Option(None, help="a model catalog YAML (default: the built-in one)"),
    ) -> None:
        """Start Ray and Serve on this machine and serve the catalog's models until Ctrl-C."""
        import logging
        import signal
        import time

        from serving import local

        args = _settings_args(config, host, port, catalog)
        settings, catalog_models, _ = _load(args)
        problems = unwritable_directories(settings)
        if problems:
            for problem in problems:
                typer.echo(f"error: {problem}", err=True)
            raise typer.Exit(2)
        started = time.perf_counter()
        # One ready line below, not Serve's one per application.
        logging.getLogger("ray.serve").addFilter(lambda record: "is ready at" not in record.getMessage())
        _first_start_tokens(settings)
        url = local.start(args)
        typer.echo(USAGE.format(url=url, models=", ".join(m.id for m in catalog_models.models)))
        typer.echo(
            READY.format(url=url, loaded=_loaded(catalog_models), seconds=time.perf_counter() - started)
        )
        # Stop cleanly on SIGTERM as on Ctrl-C, and on SIGINT even when started in the background (a shell starts
        # background jobs with SIGINT ignored, which Python would keep).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopping")
        finally:
            local.stop()

    @app.command()
    def prepare(
        config: Path | None = typer.Option(None, help="a settings YAML file (HFI_CONFIG)"),
        catalog: Path | None = typer.Option(None, help="a model catalog YAML"),
    ) -> None:
        """Build or fetch every catalog model's files once (the defaults are built from code, no download)."""
        from models.loading import resolve_source

        settings, catalog_models, _ = _load(_settings_args(config, None, None, catalog))
        for spec in catalog_models.models:
            source = resolve_source(spec, settings.load_options())
            typer.echo(f"{spec.id}: {source.directory} ({source.revision[:12]})")

    @app.command("catalog")
    def show_catalog(
        config: Path | None = typer.Option(None, help="a settings YAML file (HFI_CONFIG)"),
        catalog: Path | None = typer.Option(None, help="a model catalog YAML"),
    ) -> None:
        """Validate the model catalog against the hardware profiles and list it."""
        _, catalog_models, profiles = _load(_settings_args(config, None, None, catalog))
        for spec in catalog_models.models:
            profile = profiles.get(spec.hardware_profile)
            where = spec.source.repo_id or spec.source.path
            typer.echo(f"{spec.id:45} {spec.task:20} {profile.name:12} {where}")
