"""Typed metering errors. Those a client can trigger carry an HTTP `status_code`."""

from __future__ import annotations


class MeteringError(Exception):
    """Base class of metering errors; `status_code` says what a client would be told."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # picklable with its message (may cross a Ray handle)
        return (type(self), (self.message,))


class InvalidUsage(MeteringError, ValueError):
    """A usage record that cannot be priced (unknown profile, no price, negative time): a caller bug."""

    status_code = 500


class InvalidLookup(MeteringError, ValueError):
    """400: a cost look-up body that is not a list of request id strings, or too many of them."""

    status_code = 400


class LedgerUnavailable(MeteringError):
    """503: the ledger database cannot be reached (reports and look-ups; recording never raises this)."""

    status_code = 503


class ChargesNotRecorded(MeteringError):
    """503: this process holds charges its spool could not write (a full or failing disk), so it runs no more
    requests until they are on disk: none is answered without a durable charge. `retry_after_s` says when to
    try again (the process retries the disk meanwhile)."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.extra = {"retry_after_s": retry_after_s}

    def __reduce__(self):
        return (type(self), (self.message, self.extra["retry_after_s"]))
