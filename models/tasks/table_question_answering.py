"""table-question-answering with a TAPAS-style model and transformers' table-question-answering pipeline.

`{"inputs": {"query": str, "table": {column: [cell, ...]}}}` -> `{answer, coordinates, cells, aggregator}` (the
aggregator is "NONE" for a model without an aggregation head: the JS client requires the field). Limits: the
table's cells (`limits.max_table_cells`) and the query's characters. Work units: the table's cells.
"""

from __future__ import annotations

from typing import Any

from models.base import TaskRunner, param_bool, param_str
from models.errors import InvalidInput
from models.tasks.tabular import validate_table
from models.tasks.text_common import plain
from models.types import TABLE_QUESTION_ANSWERING, TaskRequest

PADDING = ("do_not_pad", "longest", "max_length")


class TableQuestionAnsweringRunner(TaskRunner):
    tasks = (TABLE_QUESTION_ANSWERING,)

    def load(self) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.directory))
        self.model = transformers.AutoModelForTableQuestionAnswering.from_pretrained(
            str(self.directory), dtype=self.dtype
        )
        self.model.to(self.device)
        self.model.eval()
        self.pipe = transformers.pipeline(
            "table-question-answering", model=self.model, tokenizer=self.tokenizer, device=self.device
        )

    def _inputs(self, request: TaskRequest) -> tuple[str, dict[str, list[str]]]:
        inputs = request.inputs
        if not isinstance(inputs, dict):
            raise InvalidInput("inputs must be an object with query and table")
        query = self.texts(inputs.get("query"), allow_list=False, field="inputs.query")[0]
        table = validate_table(inputs.get("table"), "inputs.table", self.spec.limits.max_table_cells)
        return query, {column: [str(v) for v in values] for column, values in table.items()}

    def _options(self, request: TaskRequest) -> dict[str, Any]:
        p = request.parameters
        return {
            "padding": param_str(p, "padding", "max_length", choices=PADDING),
            "sequential": bool(param_bool(p, "sequential", False)),
            "truncation": bool(param_bool(p, "truncation", True)),
        }

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self._inputs(request)
        self._options(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        query, table = self._inputs(request)
        opts = self._options(request)
        try:
            out = plain(self.pipe(table=table, query=query, **opts))
        except ValueError as err:  # the tokenizer refuses a table too long for the model without truncation
            raise InvalidInput(f"inputs.table: {err}") from None
        if isinstance(out, list):
            out = out[0]
        out.setdefault("aggregator", "NONE")
        out["coordinates"] = [list(c) for c in out.get("coordinates", [])]
        out["cells"] = [str(c) for c in out.get("cells", [])]
        return out, {"cells": sum(len(v) for v in table.values())}

    def work_units(self, request: TaskRequest) -> int:
        table = request.inputs.get("table") if isinstance(request.inputs, dict) else None
        if not isinstance(table, dict):
            return 1
        return max(1, sum(len(v) for v in table.values() if isinstance(v, list)))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
