"""tabular-classification and tabular-regression: a table of columns in, one prediction per row out.

The clients send the table two ways: the JS client (and the hosted API's documentation) as
`{"inputs": {"data": {column: [values]}}}`, the Python client as `{"table": {column: [values]}, "parameters": {}}`.
Both, and `{"inputs": {column: [values]}}`, reach the runner as the table itself.
"""

from __future__ import annotations

from typing import Any

from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.types import TABULAR_CLASSIFICATION, TABULAR_REGRESSION, TaskRequest
from serving.routes.base import Parsed, RequestContext, TaskAdapter, require_dict
from serving.routes.text_schemas import OPENAPI


def table_of(body: dict[str, Any]) -> Any:
    inputs = body.get("inputs")
    if inputs is None:
        if "table" not in body:
            raise InvalidInput('inputs.data is required: {"inputs": {"data": {column: [values]}}}')
        return body["table"]
    if isinstance(inputs, dict) and "data" in inputs:
        return inputs["data"]
    if isinstance(inputs, dict) and inputs and all(isinstance(v, list) for v in inputs.values()):
        return inputs
    raise InvalidInput("inputs must be an object with data: {column: [values]}")


class TabularAdapter(TaskAdapter):
    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        return Parsed(TaskRequest(self.task, table_of(body), {}, ctx.request_id))

    @property
    def openapi(self) -> dict[str, Any]:
        return OPENAPI[self.task]


class TabularClassificationAdapter(TabularAdapter):
    task = TABULAR_CLASSIFICATION


class TabularRegressionAdapter(TabularAdapter):
    task = TABULAR_REGRESSION


TABULAR_ADAPTERS: tuple[TaskAdapter, ...] = (TabularClassificationAdapter(), TabularRegressionAdapter())
