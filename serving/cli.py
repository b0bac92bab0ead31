"""`hfi`: the command line. Each layer contributes its own sub-commands; heavy imports stay inside commands."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Self-hosted hf-inference backend.")


def _register_subcommands() -> None:
    # Each layer keeps its commands beside its code: serving/commands.py, bench/cli.py, metering/cli.py, ...
    import importlib

    for module in ("serving.commands", "serving.status_command", "bench.cli", "metering.cli", "billing.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:
                continue  # that layer has no commands yet
            raise
        mod.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
