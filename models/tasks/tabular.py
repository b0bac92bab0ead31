"""tabular-classification and tabular-regression with scikit-learn estimators, as the hosted service ran them.

A model directory is laid out like the Hub's sklearn repositories: `config.json` with an `sklearn` section naming
the feature `columns` and the `model.file`. A `.skops` file is loaded with skops, which refuses types outside
scikit-learn, numpy and scipy unless the catalog lists them (`options.trusted_types`); a pickle or joblib file only
with `options.allow_pickle: true` (it can run code: only for repositories you trust).

Input: a table `{column: [value, ...]}`, every column as long as the others; a column whose values all read as
numbers is given to the model as numbers (the JS client sends strings). Output: one prediction per row.
Work units: the table's cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.base import TaskRunner
from models.errors import InvalidInput
from models.types import TABULAR_CLASSIFICATION, TABULAR_REGRESSION, TaskRequest

_SAFE_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.")
_SCALARS = (str, int, float, bool)


def validate_table(table: Any, field: str, max_cells: int) -> dict[str, list[Any]]:
    """A non-empty `{column: [scalar, ...]}` with columns of one length and at most `max_cells` cells."""
    if not isinstance(table, dict):
        raise InvalidInput(f"{field} must be an object of columns: {{column: [value, ...]}}")
    if not table:
        raise InvalidInput(f"{field} must not be empty")
    rows = None
    for column, values in table.items():
        if not isinstance(values, list):
            raise InvalidInput(f"{field}.{column} must be a list of values")
        if rows is None:
            rows = len(values)
        elif len(values) != rows:
            raise InvalidInput(f"{field}.{column} has {len(values)} values, the first column has {rows}")
        for i, value in enumerate(values):
            if not isinstance(value, _SCALARS):
                raise InvalidInput(f"{field}.{column}[{i}] must be a string or a number")
    if not rows:
        raise InvalidInput(f"{field} has no rows")
    cells = rows * len(table)
    if cells > max_cells:
        raise InvalidInput(f"{field} has {cells} cells, more than this model's limit of {max_cells}")
    return table


def _numeric(values: list[Any]) -> list[Any]:
    """The column as floats when every value reads as a number, else as given."""
    if any(isinstance(v, bool) for v in values):
        return values
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return values


class TabularRunner(TaskRunner):
    """Predicts one value per row of a table with a scikit-learn estimator."""

    def load(self) -> None:
        config_path = self.directory / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        section = config.get("sklearn") or {}
        name = (section.get("model") or {}).get("file") or self._find_model_file()
        self.model_file = self.directory / name
        self.estimator = self._load_estimator(self.model_file)
        columns = section.get("columns") or list(getattr(self.estimator, "feature_names_in_", []) or [])
        self.columns: list[str] = [str(c) for c in columns]

    def _find_model_file(self) -> str:
        for pattern in ("*.skops", "*.joblib", "*.pkl"):
            found = sorted(self.directory.glob(pattern))
            if found:
                return found[0].name
        raise FileNotFoundError(f"model {self.spec.id}: no .skops, .joblib or .pkl file in {self.directory}")

    def _load_estimator(self, path: Path) -> Any:
        if path.suffix == ".skops":
            import skops.io as sio

            untrusted = sio.get_untrusted_types(file=path)
            allowed = set(self.spec.options.get("trusted_types") or [])
            refused = [t for t in untrusted if not t.startswith(_SAFE_PREFIXES) and t not in allowed]
            if refused:
                raise ValueError(
                    f"model {self.spec.id}: {path.name} holds types outside scikit-learn, numpy and scipy: "
                    f"{', '.join(refused)}; list them in options.trusted_types to load it"
                )
            return sio.load(path, trusted=untrusted)
        if not self.spec.options.get("allow_pickle"):
            raise ValueError(
                f"model {self.spec.id}: {path.name} is a pickle, which can run code when loaded; set "
                "options.allow_pickle: true in the catalog for a repository you trust"
            )
        import joblib

        return joblib.load(path)

    def _table(self, request: TaskRequest) -> dict[str, list[Any]]:
        return validate_table(request.inputs, "inputs.data", self.spec.limits.max_table_cells)

    def _frame(self, table: dict[str, list[Any]]) -> Any:
        import pandas as pd

        columns = self.columns or list(table)
        missing = [c for c in columns if c not in table]
        if missing:
            raise InvalidInput(
                f"inputs.data is missing the column(s) {', '.join(missing)} (this model reads: "
                f"{', '.join(columns)})"
            )
        return pd.DataFrame({c: _numeric(table[c]) for c in columns}, columns=columns)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self._frame(self._table(request))

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        frame = self._frame(self._table(request))
        try:
            predictions = self.estimator.predict(frame if self.columns else frame.to_numpy())
        except (ValueError, TypeError) as err:  # values the estimator cannot use (a word in a number column)
            raise InvalidInput(f"inputs.data: the model cannot use these values: {err}") from None
        return self._render(predictions), {"rows": len(frame)}

    def _render(self, predictions: Any) -> list[Any]:
        return [v.item() if hasattr(v, "item") else v for v in predictions]

    def work_units(self, request: TaskRequest) -> int:
        table = request.inputs if isinstance(request.inputs, dict) else {}
        return max(1, sum(len(v) for v in table.values() if isinstance(v, list)))

    def memory_bytes(self) -> int:
        return self.model_file.stat().st_size


class TabularClassificationRunner(TabularRunner):
    tasks = (TABULAR_CLASSIFICATION,)


class TabularRegressionRunner(TabularRunner):
    tasks = (TABULAR_REGRESSION,)

    def _render(self, predictions: Any) -> list[Any]:
        return [float(v) for v in predictions]
