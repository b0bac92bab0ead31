"""Typed billing errors: each carries its HTTP `status_code` and a `message` safe to show to the client.

They pickle with their message intact (they may cross a Ray handle); serving/errors.py maps them to HTTP.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base of the errors a caller can trigger in billing."""

    status_code: int = 500
    error_type: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the subclass and the message across pickling
        return (type(self), (self.message,))


class Unauthorized(BillingError):
    """401: the token is missing, unknown or revoked."""

    status_code = 401


class PaymentRequired(BillingError):
    """402: the billed account may not spend (free tier out of credits, spending limit reached)."""

    status_code = 402


class Forbidden(BillingError):
    """403: billing an organization the caller may not bill, or a model disabled for it."""

    status_code = 403


class NotFound(BillingError):
    """404: an account, organization or token named in an admin operation does not exist."""

    status_code = 404


class Conflict(BillingError):
    """409: the name is taken."""

    status_code = 409


class InvalidRequest(BillingError):
    """400: a bad admin operation (unknown tier, bad name); the message names the field."""

    status_code = 400


class HubUnavailable(BillingError):
    """503: the Hub could not be asked about a Hugging Face token."""

    status_code = 503


class HubError(Exception):
    """The Hub's partner API refused an operation (operator-facing, from `hfi hub sync`)."""
