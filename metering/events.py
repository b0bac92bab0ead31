"""Usage events: one CloudEvents 1.0 event per charge, and the sinks they go to (ports and adapters).

The port is `EventSink.emit(events)`: deliver the whole batch or raise. Adapters: `JsonLinesSink` (a file),
`HttpCollectorSink` (batched POSTs shaped like OpenMeter's ingest API), and `InMemorySink` (a fake for tests).
Retries are the caller's: the spool consumer that feeds a sink resends the same batch, with the same event ids
(the request ids), until the sink accepts it, so a collector that deduplicates by id sees each charge once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from metering.records import Charge, with_derived

CLOUDEVENTS_BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# The statuses that say the payload itself is bad: a retry of the same events would be refused again. Every other
# failure (401/403 while a token is rotated, 404 while a collector is redeployed, 408, 425, 429, 5xx, no
# connection) is retried with back-off: usage events are never given up because the collector is unwell.
PAYLOAD_REFUSED_STATUSES = frozenset({400, 413, 415, 422})


def charge_event(
    charge_data: dict[str, Any], *, source: str, event_type: str = "inference.usage"
) -> dict[str, Any]:
    """CloudEvents 1.0 JSON of a charge given as `Charge.to_dict()` or as spooled (`Charge.spool_record()`: the
    derived fields are added back): id = request id, subject = account. Raises KeyError, TypeError or ValueError
    for a record that is not a charge."""
    charge_data = with_derived(charge_data)
    return {
        "specversion": "1.0",
        "id": charge_data["request_id"],
        "source": source,
        "type": event_type,
        "subject": charge_data["billed_account"],
        "time": charge_data["started_at"],
        "datacontenttype": "application/json",
        "data": charge_data,
    }


def event_of(charge: Charge, *, source: str, event_type: str = "inference.usage") -> dict[str, Any]:
    """The CloudEvents 1.0 JSON of a charge."""
    return charge_event(charge.to_dict(), source=source, event_type=event_type)


class PermanentDeliveryError(Exception):
    """The sink refused the events themselves (e.g. HTTP 400): retrying them cannot help. The spool consumer
    then sends the batch's events one at a time and dead-letters those refused alone (metering/drain.py)."""


@runtime_checkable
class EventSink(Protocol):
    """Where usage events go. `emit` delivers the whole batch or raises (the caller retries it)."""

    def emit(self, events: Sequence[dict[str, Any]]) -> None: ...


class JsonLinesSink:
    """Appends events to a file, one JSON object a line, fsync'd per batch."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        with self._lock, self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        pass


class InMemorySink:
    """A fake sink for tests: keeps the events; `fail_next` makes that many emits raise first."""

    def __init__(self, fail_next: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self.attempts += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                raise ConnectionError("in-memory sink: simulated failure")
            self.events.extend(events)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]

    def close(self) -> None:
        pass


class HttpCollectorSink:
    """POSTs a batch of events as `application/cloudevents-batch+json` (OpenMeter's `POST /api/v1/events`).

    2xx: delivered. 400, 413, 415, 422 (the payload is bad): PermanentDeliveryError. Any other status (401 and
    403 too: tokens get rotated) and connection errors: ConnectionError, so the batch is retried with the same
    ids.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _http(self) -> Any:
        if self._client is None:
            import httpx  # imported on first use: keeps `import metering` fast

            headers = {"Content-Type": CLOUDEVENTS_BATCH_CONTENT_TYPE}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._client = httpx.Client(timeout=self.timeout_s, headers=headers)
        return self._client

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        if not events:
            return
        body = json.dumps(list(events), separators=(",", ":")).encode()
        import httpx

        with self._lock:
            try:
                response = self._http().post(self.url, content=body)
            except httpx.HTTPError as err:  # connection refused, timeout, ...: transient
                raise ConnectionError(f"collector {self.url}: {type(err).__name__}: {err}") from err
        status = response.status_code
        if 200 <= status < 300:
            return
        message = f"collector {self.url} answered {status}: {response.text[:200]}"
        if status in PAYLOAD_REFUSED_STATUSES:
            raise PermanentDeliveryError(message)
        raise ConnectionError(message)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
