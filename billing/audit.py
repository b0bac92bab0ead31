"""The audit log of admin actions: who did what, when, from where, and how it was answered.

Written by the admin API (serving/security.py, after each non-read admin request by an authenticated caller) and
by `hfi accounts` commands that change something; listed by `hfi accounts audit`. Rows are never updated.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from billing.db import read_session, write_session
from billing.schema import AuditEntry
from core.utc import as_utc, utcnow

MAX_LISTED = 10_000


@dataclass(frozen=True)
class AuditLine:
    """One audit entry, plain."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str | None
    status: int
    source: str

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


def _cut(value: str | None, size: int) -> str | None:
    return None if value is None else value[:size]


def record(
    engine: Engine,
    *,
    actor: str,
    action: str,
    status: int,
    source: str,
    target: str | None = None,
    at: dt.datetime | None = None,
) -> None:
    """Append one entry (the billing tables must exist: BillingService.ensure_schema)."""
    with write_session(engine) as s:
        s.add(
            AuditEntry(
                at=as_utc(at or utcnow()),
                actor=_cut(actor, 120),
                action=_cut(action, 300),
                target=_cut(target, 300),
                status=status,
                source=_cut(source, 120),
            )
        )


def entries(
    engine: Engine, *, since: dt.datetime | None = None, actor: str | None = None, limit: int = 100
) -> list[AuditLine]:
    """The most recent entries first (at most `limit`, at most MAX_LISTED), optionally since a time or by one
    actor."""
    query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
    if since is not None:
        query = query.where(AuditEntry.at >= as_utc(since))
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    with read_session(engine) as s:
        rows = s.scalars(query.limit(max(1, min(limit, MAX_LISTED)))).all()
        return [AuditLine(r.id, as_utc(r.at), r.actor, r.action, r.target, r.status, r.source) for r in rows]
