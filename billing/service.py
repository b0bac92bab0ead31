"""The billing facade the ingress calls: admit before compute, settle or release after.

billing = BillingService(settings.billing, settings.metering.database_url)
admission = billing.admit(token, bill_to, model_id, estimate_nanousd, started_at,
                          request_id=inference_id)   # 401/402/403 raise here
try:
    ... run ...
except BaseException:
    billing.release(admission); raise
billing.settle(admission, charge.cost_nanousd, request_id=..., hardware_profile=...)

Admission reads cached tokens and policies and takes its estimate from an in-memory budget lease, so it touches
the database only on a cache miss or when the lease rolls over (`admit_nowait` says whether it can decide
without it); settle and release only queue in memory, written behind the response in batches (SpendBook).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from sqlalchemy.exc import OperationalError

from billing.accounts import AccountStore, BilledAccount, Caller
from billing.config import BillingSettings
from billing.db import DatabaseDown, LazyMigrations
from billing.errors import AccountsUnavailable, Forbidden, PaymentRequired, Unauthorized
from billing.hub import WhoamiCache
from billing.reconcile import Reconciliation, reconcile
from billing.reports import (
    check_limit,
    check_month,
    ledger_has_account,
    ledger_usage_report,
    month_bounds,
    usage_report,
)
from billing.spend import Housekeeping, Leasing, SpendBook, SweepResult, month_of
from billing.usage_access import LOCAL, usage_scope
from core.db import BILLING, make_engine
from core.money import NANOUSD_PER_USD
from core.utc import as_utc, utcnow

FREE_TIER_MESSAGE = (
    "You have exceeded your monthly included credits for Inference Providers. "
    "Subscribe to PRO to get 20x more monthly included credits."
)


def estimate_nanousd(usd_per_second: Fraction | Decimal | int, compute_seconds: float | Fraction) -> int:
    """What to reserve at admission: `compute_seconds` at the profile's price, rounded up to a nano-USD."""
    seconds = Fraction(compute_seconds) if not isinstance(compute_seconds, Fraction) else compute_seconds
    exact = Fraction(usd_per_second) * seconds * NANOUSD_PER_USD
    if exact < 0:
        raise ValueError("an estimate cannot be negative")
    return math.ceil(exact)


@dataclass(frozen=True)
class Admission:
    """An admitted request: plain and picklable, handed from admit() to settle() or release()."""

    user: str
    billed_account: str
    kind: Literal["local", "hf-routed"]
    model_id: str
    started_at: dt.datetime
    month: str  # YYYY-MM (UTC): the month the request is charged in
    reservation_id: str | None
    estimate_nanousd: int


def _refusal(account: BilledAccount) -> PaymentRequired:
    if not account.pay_as_you_go:
        if account.kind == "user":
            return PaymentRequired(FREE_TIER_MESSAGE)
        return PaymentRequired(
            f"The organization {account.name} has used its monthly included credits for Inference Providers."
        )
    return PaymentRequired(
        f"The monthly spending limit of {account.name} has been reached. "
        "An administrator can raise it to continue."
    )


class BillingService:
    """Accounts, admission, settlement and reports on one database (the ledger's)."""

    def __init__(
        self,
        settings: BillingSettings,
        database_url: str,
        clock: Callable[[], dt.datetime] | None = None,
        *,
        migrate: bool = True,
    ) -> None:
        self.settings = settings
        self._clock_fn = clock or utcnow
        self.database_url = database_url
        # No connection here: the service starts while the database is down (open mode never needs it on the
        # request path). The first use of `accounts` or `spend` runs the migrations (LazyMigrations).
        self.engine = make_engine(database_url, BILLING)
        self.migrations: LazyMigrations | None = LazyMigrations(self.engine) if migrate else None
        self._accounts = AccountStore(self.engine, settings, clock=self.now)
        self._spend = SpendBook(
            self.engine,
            allowance_nanousd=settings.overshoot_allowance_nanousd,
            reservation_ttl_s=settings.reservation_ttl_s,
            housekeeping=Housekeeping.from_settings(settings),
            leasing=Leasing.from_settings(settings),
            clock=self.now,
        )
        self._whoami: WhoamiCache | None = None

    def ensure_schema(self) -> None:
        """Migrate billing's tables on first use; AccountsUnavailable (503, `retry_after_s`) while the database
        cannot be reached. Retried by a later call after a short back-off; no restart needed."""
        if self.migrations is None:
            return
        try:
            self.migrations.ensure()
        except DatabaseDown as err:
            raise AccountsUnavailable(
                "The accounts database cannot be reached. Try again shortly.", retry_after_s=err.retry_after_s
            ) from err

    @property
    def accounts(self) -> AccountStore:
        """Users, organizations and tokens (migrates on first use: see ensure_schema)."""
        self.ensure_schema()
        return self._accounts

    @property
    def spend(self) -> SpendBook:
        """Reservations and settled costs (migrates on first use: see ensure_schema)."""
        self.ensure_schema()
        return self._spend

    def now(self) -> dt.datetime:
        """The service clock, aware UTC."""
        return as_utc(self._clock_fn())

    @property
    def whoami(self) -> WhoamiCache:
        """The Hub whoami client (created on first use)."""
        if self._whoami is None:
            s = self.settings
            self._whoami = WhoamiCache(
                s.hub_url,
                ttl_s=s.hub_whoami_cache_s,
                negative_ttl_s=s.hub_whoami_negative_cache_s,
                timeout_s=s.hub_timeout_s,
                max_concurrency=s.hub_whoami_max_concurrency,
                max_pending=s.hub_whoami_max_pending,
            )
        return self._whoami

    # --- admission

    def admit(
        self,
        token: str | None,
        bill_to: str | None,
        model_id: str,
        estimate_nanousd: int,
        started_at: dt.datetime,
        *,
        request_id: str | None = None,
    ) -> Admission:
        """Decide before any compute: 401 token, 403 bill-to or disabled model, 402 credits or limit; 503 when
        the accounts database cannot be reached.

        `request_id`: the request's Inference-Id, the key of its charge in the metering ledger. Stored on the
        reservation, it lets a lost settlement be settled from the ledger (see SpendBook.sweep).
        """
        try:
            return self._admit(token, bill_to, model_id, estimate_nanousd, started_at, request_id)
        except OperationalError as err:
            raise AccountsUnavailable(
                "The accounts database cannot be reached: the request was not run. Try again shortly."
            ) from err

    def admit_nowait(
        self,
        token: str | None,
        bill_to: str | None,
        model_id: str,
        estimate_nanousd: int,
        started_at: dt.datetime,
        *,
        request_id: str | None = None,
    ) -> Admission | None:
        """`admit` when it can decide without the database, so an event loop may call it itself: the token and
        the billed account's policy are cached and the account's budget lease covers the estimate (or it has no
        cap). None when it cannot: then call `admit` (in a worker thread: it may wait on the database). Refusals
        the caches already know (401, 403) raise here as in `admit`."""
        if self.settings.mode == "open":
            return self._admit(token, bill_to, model_id, estimate_nanousd, started_at, request_id)
        token = (token or "").strip()
        if not token:
            raise Unauthorized("Missing credentials: send Authorization: Bearer <token>")
        if self.migrations is not None and not self.migrations.done:
            return None
        if not token.startswith(self.settings.token_prefix):
            return None  # a Hugging Face token, or none of ours: admit() says which
        caller = self._accounts.cached_caller(token)
        if caller is None:
            return None
        bill_to = (bill_to or "").strip() or None
        account = self._accounts.cached_billed_account(caller, bill_to, model_id)
        if account is None:
            return None
        started_at = as_utc(started_at)
        estimate = max(int(estimate_nanousd), self.settings.min_estimate_nanousd)
        rid = self._spend.reserve_in_memory(
            account=account.name,
            cap_nanousd=account.cap_nanousd,
            user=caller.name,
            kind="local",
            model_id=model_id,
            started_at=started_at,
            estimate_nanousd=estimate,
            request_id=request_id,
        )
        if rid is None:
            return None
        return Admission(
            user=caller.name,
            billed_account=account.name,
            kind="local",
            model_id=model_id,
            started_at=started_at,
            month=month_of(started_at),
            reservation_id=rid,
            estimate_nanousd=estimate,
        )

    def _admit(
        self,
        token: str | None,
        bill_to: str | None,
        model_id: str,
        estimate_nanousd: int,
        started_at: dt.datetime,
        request_id: str | None = None,
    ) -> Admission:
        started_at = as_utc(started_at)
        estimate = max(int(estimate_nanousd), self.settings.min_estimate_nanousd)
        if self.settings.mode == "open":
            # Nothing to enforce: no database work on the request path; the ledger has the charges.
            local = self.settings.local_account
            return Admission(
                user=local,
                billed_account=local,
                kind="local",
                model_id=model_id,
                started_at=started_at,
                month=month_of(started_at),
                reservation_id=None,
                estimate_nanousd=0,
            )
        token = (token or "").strip()
        if not token:
            raise Unauthorized("Missing credentials: send Authorization: Bearer <token>")
        if token.startswith(self.settings.token_prefix):
            caller = self.accounts.resolve_token(token)
            account = self.accounts.billed_account(caller, (bill_to or "").strip() or None, model_id)
            reservation = self._reserve(
                account.name, account.cap_nanousd, caller.name, model_id, estimate, started_at, request_id
            )
            if reservation is None:
                raise _refusal(account)
            return reservation
        if self.settings.accept_hf_tokens:
            return self._admit_routed(token, bill_to, model_id, started_at)
        raise Unauthorized("Invalid credentials in Authorization header")

    def _reserve(
        self,
        account: str,
        cap: int | None,
        user: str,
        model_id: str,
        estimate: int,
        started_at: dt.datetime,
        request_id: str | None = None,
    ) -> Admission | None:
        rid = self.spend.reserve(
            account=account,
            cap_nanousd=cap,
            user=user,
            kind="local",
            model_id=model_id,
            started_at=started_at,
            estimate_nanousd=estimate,
            request_id=request_id,
        )
        if rid is None:
            return None
        return Admission(
            user=user,
            billed_account=account,
            kind="local",
            model_id=model_id,
            started_at=started_at,
            month=month_of(started_at),
            reservation_id=rid,
            estimate_nanousd=estimate,
        )

    def _admit_routed(
        self, token: str, bill_to: str | None, model_id: str, started_at: dt.datetime
    ) -> Admission:
        ident = self.whoami.identify(token)
        prefix = self.settings.routed_account_prefix
        bill_to = (bill_to or "").strip() or None
        billed = ident.name
        if bill_to and bill_to != ident.name:
            if bill_to not in ident.orgs:
                raise Forbidden(f"You cannot bill the organization {bill_to!r}: you are not a member of it")
            billed = bill_to
        # Routed traffic is billed by Hugging Face from the ledger's cost look-up: no credits or limits here.
        return Admission(
            user=prefix + ident.name,
            billed_account=prefix + billed,
            kind="hf-routed",
            model_id=model_id,
            started_at=started_at,
            month=month_of(started_at),
            reservation_id=None,
            estimate_nanousd=0,
        )

    def settle(
        self,
        admission: Admission,
        cost_nanousd: int,
        *,
        request_id: str | None = None,
        hardware_profile: str | None = None,
    ) -> None:
        """Charge the true cost of an admitted request that ran, in the month it started: queued in memory and
        written behind the response, in a batch (see SpendBook)."""
        if admission.reservation_id is None:
            return
        self.spend.settle(
            admission.reservation_id, cost_nanousd, request_id=request_id, hardware_profile=hardware_profile
        )

    def release(self, admission: Admission) -> None:
        """Give back the whole reservation of a request that failed (nothing charged). Idempotent; in memory
        when its lease still holds it, else written behind."""
        if admission.reservation_id is None:
            return
        self.spend.release(admission.reservation_id)

    # --- callers of the account API

    def authenticate(self, token: str | None) -> Caller:
        """The caller behind one of our tokens, or the admin secret from settings; Unauthorized otherwise."""
        token = (token or "").strip()
        if not token:
            raise Unauthorized("Missing credentials: send Authorization: Bearer <token>")
        admin = self.settings.admin_token
        if admin and _same(token, admin):
            return Caller(name="(admin)", tier="", is_admin=True)
        if not token.startswith(self.settings.token_prefix):
            raise Unauthorized("Invalid credentials in Authorization header")
        # Never from the cache: a revoked token is refused by the account API at once, on every replica.
        return self.accounts.resolve_token(token, cached=False)

    def require_admin(self, token: str | None) -> Caller:
        """A server administrator, or Forbidden."""
        caller = self.authenticate(token)
        if not caller.is_admin:
            raise Forbidden("This operation needs an administrator token")
        return caller

    def can_manage(self, caller: Caller, account: str) -> bool:
        """Server admins manage everything; an org admin manages the org's limit, models and usage."""
        return caller.is_admin or caller.name == account or self.accounts.is_org_admin(caller.name, account)

    def usage(
        self,
        caller: Caller,
        account: str | None = None,
        month: str | None = None,
        *,
        limit: int | str | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """A month's usage that `caller` may see (billing.usage_access): their own, an organization's (its
        admins per member, its other members its totals and only their own charges), any account's or every
        account's for an operator.

        Totals cover the whole month; `charges` is one page of at most `limit` charges (default
        DEFAULT_CHARGES_LIMIT, at most MAX_CHARGES_LIMIT: more is a 400), the next one from `next_cursor`.
        """
        month = check_month(month) if month else self.now().strftime("%Y-%m")
        page = {"limit": check_limit(limit), "cursor": cursor}
        open_mode = self.settings.mode == "open"
        scope = usage_scope(
            caller,
            account,
            lambda: self.accounts,
            local_account=self.settings.local_account if open_mode else None,
            in_ledger=lambda name: ledger_has_account(self.engine, name),
        )
        if scope.account is None:
            return ledger_usage_report(self.engine, None, month, **page)
        if scope.from_ledger:
            plan = "open" if scope.kind == LOCAL else "none"  # no credits, no limit: billed as it runs
            kind = "user" if scope.kind == LOCAL else scope.kind
            unmanaged = BilledAccount(scope.account, kind, plan, 0, True, None)
            return ledger_usage_report(self.engine, unmanaged, month, **page)
        policy = self.accounts.account_policy(scope.account)
        page["charges_user"] = scope.charges_user
        self.spend.flush()  # this process's settlements, written behind, are in the report it asks for
        pruned_before = self.spend.pruned_before()
        if pruned_before is not None and month_bounds(month)[0] < pruned_before:
            # Old reservations are pruned: a month that may have lost some is read from the ledger (complete).
            return ledger_usage_report(self.engine, policy, month, per_member=scope.per_member, **page)
        return usage_report(self.engine, policy, month, per_member=scope.per_member, **page)

    def reconcile(self, month: str) -> Reconciliation:
        """Billing's settled costs of `month` against the metering ledger's charges, request by request."""
        self.ensure_schema()
        self._spend.flush()
        return reconcile(
            self.engine,
            self.database_url,
            month,
            routed_prefix=self.settings.routed_account_prefix,
            pruned_before=self.spend.pruned_before(),
        )

    def sweep_reservations(self) -> SweepResult:
        """Settle lost settlements from the ledger and expire stale reservations now (also run in the
        background every `sweep_interval_s`)."""
        return self.spend.sweep()

    def prune_reservations(self, *, dry_run: bool = False) -> int:
        """Delete finished reservations older than `reservation_retention_days` now (also run in the
        background every `prune_interval_s`); the number deleted, or that would be with `dry_run`."""
        return self.spend.prune(dry_run=dry_run)

    def close(self) -> None:
        """Give back this process's budget leases, write its queued settlements, and release the database
        connections and the Hub client."""
        if self._whoami is not None:
            self._whoami.close()
        self._spend.close()  # its background housekeeping first: it uses the engine
        self.engine.dispose()


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())
