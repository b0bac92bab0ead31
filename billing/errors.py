"""Typed billing errors: each carries its HTTP `status_code` and a `message` safe to show to the client.

They are core.errors.ServiceError subclasses: they pickle with their message intact (they may cross a Ray
handle) and serving/errors.py maps them to HTTP like every other typed error.
"""

from __future__ import annotations

from core.errors import ServiceError


class BillingError(ServiceError):
    """Base of the errors a caller can trigger in billing (a ServiceError: serving maps it like the others)."""

    status_code: int = 500
    error_type: str | None = None


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


class AccountsUnavailable(BillingError):
    """503: the accounts database cannot be reached, so a request cannot be admitted (nothing is charged)."""

    status_code = 503
    error_type = "overloaded"


class HubError(Exception):
    """The Hub's partner API refused an operation (operator-facing, from `hfi hub sync`)."""
