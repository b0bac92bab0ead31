"""Who may see whose usage: the one access rule of the usage API (`GET /billing/usage`, `hfi accounts usage`,
the billing page).

- **Anyone** sees their own usage: their account's month. An organization's **admins** see the organization's,
  with its usage per member; its other members see its totals and only their own charges.
- An **operator** (an administrator: the admin token, a server administrator's token, the CLI) sees everyone's:
  any account by name, billing's own or one that only the metering ledger knows (routed Hugging Face traffic),
  and, asking for no account while being no account (the admin token, the CLI), every account together.
- Anything else is refused (403), whether or not the account exists; an operator is told when no account has
  that name (404).

`usage_scope` decides; BillingService.usage builds the report it names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from billing.accounts import NAME_RE, Caller
from billing.errors import Forbidden, InvalidRequest, NotFound
from billing.reports import EVERY_ACCOUNT

LOCAL = "local"  # open mode's one account: its charges are in the ledger only
EXTERNAL = "external"  # an account the ledger bills and billing does not manage (routed Hugging Face traffic)
MAX_ACCOUNT_CHARS = 256  # the ledger's billed_account column


class AccountLookup(Protocol):
    """What the rule asks of the accounts (billing.accounts.AccountStore)."""

    def account_kind(self, name: str) -> str: ...

    def is_org_admin(self, user: str, org: str) -> bool: ...

    def org_members(self, org: str) -> list[str]: ...


@dataclass(frozen=True)
class UsageScope:
    """What a caller may see: one account's month (or every account's), in full or in part."""

    account: str | None  # None: every account together (operators only)
    kind: str  # "user", "org", LOCAL, EXTERNAL, or EVERY_ACCOUNT
    per_member: bool = False  # an organization's usage per member (its admins, operators)
    charges_user: str | None = None  # list only this user's charges (an organization's other members)

    @property
    def from_ledger(self) -> bool:
        """Reported from the metering ledger: billing keeps no reservations for these."""
        return self.kind in (LOCAL, EXTERNAL, EVERY_ACCOUNT)


def is_account(caller: Caller) -> bool:
    """Whether the caller is an account (a user); the admin token and the CLI's operator are not."""
    return bool(NAME_RE.match(caller.name))


def usage_scope(
    caller: Caller,
    account: str | None,
    accounts: Callable[[], AccountLookup],
    *,
    local_account: str | None = None,
    in_ledger: Callable[[str], bool] = lambda name: False,
) -> UsageScope:
    """The usage `caller` may see of `account` (None or "": their own; every account for an operator who is
    no account). Forbidden (403), NotFound (404, operators only) or InvalidRequest (400, a name too long).

    `accounts()` gives the account store (called only when needed: open mode's account needs no database work);
    `local_account`: open mode's one account; `in_ledger(name)`: whether the ledger has billed `name`."""
    account = (account or "").strip() or None
    if account is None:
        if caller.is_admin and not is_account(caller):
            return UsageScope(None, EVERY_ACCOUNT)
        account = caller.name
    if len(account) > MAX_ACCOUNT_CHARS:
        raise InvalidRequest(f"account: at most {MAX_ACCOUNT_CHARS} characters")
    if local_account is not None and account == local_account:
        if caller.is_admin or caller.name == account:
            return UsageScope(account, LOCAL)
        raise _refused(account)
    kind = _kind(accounts, account) if NAME_RE.match(account) else None
    if kind is None:  # not one of billing's accounts
        if not caller.is_admin:
            raise _refused(account)
        if in_ledger(account):
            return UsageScope(account, EXTERNAL)
        raise NotFound(f"no account named {account!r}")
    if caller.is_admin:
        return UsageScope(account, kind, per_member=kind == "org")
    return _own(caller, account, kind, accounts())


def _kind(accounts: Callable[[], AccountLookup], account: str) -> str | None:
    try:
        return accounts().account_kind(account)
    except NotFound:
        return None


def _own(caller: Caller, account: str, kind: str, accounts: AccountLookup) -> UsageScope:
    """What a caller who is not an operator may see of an existing account."""
    if kind == "user":
        if caller.name == account:
            return UsageScope(account, kind)
    elif accounts.is_org_admin(caller.name, account):
        return UsageScope(account, kind, per_member=True)
    elif caller.name in accounts.org_members(account):
        return UsageScope(account, kind, charges_user=caller.name)
    raise _refused(account)


def _refused(account: str) -> Forbidden:
    return Forbidden(
        f"You cannot see the usage of {account!r}: only your own, and your organizations' (an administrator "
        "token sees every account's)"
    )
