"""Accounts: users, organizations, members, tokens, spending limits and disabled models.

The operations behind `hfi accounts` and the admin API, and the read side admission uses. Admission's reads (a
token's owner, the billed account's policy) are cached for `billing.token_cache_ttl_s` (unknown and revoked tokens
too, in a cache of their own with a bound, so a flood of made-up tokens cannot push the good ones out): a change
made through this store clears its caches at once; one made on another replica is seen here within the TTL.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from billing.cache import TtlCache, missing
from billing.config import BillingSettings, TierPolicy
from billing.db import read_session, write_session
from billing.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from billing.schema import DisabledModel, Org, OrgMember, Token, User
from billing.tokens import new_token, new_token_id, token_hint, token_sha256
from core.utc import utcnow
from models.catalog import MODEL_ID_PATTERN

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)
TOKEN_CACHE_ENTRIES = 100_000
UNKNOWN_TOKEN_CACHE_ENTRIES = 10_000  # refusals: bounded apart, so made-up tokens never evict good ones
POLICY_CACHE_ENTRIES = 100_000
MAX_NANOUSD = 2**63 - 1  # a spending limit, as the ledger's 64-bit integers hold it
# An organization's seats: the database's 32-bit integer, with room to multiply by a price.
MAX_SEATS = 1_000_000
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Caller:
    """The user a token belongs to."""

    name: str
    tier: str
    is_admin: bool
    token_id: str | None = None


@dataclass(frozen=True)
class BilledAccount:
    """The account a request is billed to, with what it may spend this month."""

    name: str
    kind: str  # "user" | "org"
    policy_name: str  # the user's tier or the organization's plan
    included_nanousd: int
    pay_as_you_go: bool
    spending_limit_nanousd: int | None

    @property
    def cap_nanousd(self) -> int | None:
        """The most the month may commit: included credits, plus the pay-as-you-go limit; None: no cap."""
        if not self.pay_as_you_go:
            return self.included_nanousd
        if self.spending_limit_nanousd is None:
            return None
        return self.included_nanousd + self.spending_limit_nanousd


@dataclass
class NewToken:
    """A token just issued: `token` is shown once and never stored."""

    token_id: str
    user: str
    token: str


@dataclass
class AccountInfo:
    """One account as listed by `hfi accounts list` and the admin API."""

    name: str
    kind: str
    tier_or_plan: str
    spending_limit_nanousd: int | None
    is_admin: bool = False
    seats: int | None = None
    members: list[dict[str, object]] = field(default_factory=list)
    disabled_models: list[str] = field(default_factory=list)
    tokens: list[dict[str, object]] = field(default_factory=list)


def check_name(name: str, what: str = "name") -> str:
    """Account names: letters, digits, `.`, `_`, `-`; up to 96 characters."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"{what}: {name!r} is not a valid account name (letters, digits, '.', '_', '-')")
    return name


def check_label(label: str) -> str:
    """A token's label: up to 100 printable characters."""
    if not isinstance(label, str) or len(label) > 100 or not label.isprintable():
        raise InvalidRequest(f"label: up to 100 printable characters, got {label[:120]!r}")
    return label


def included_for(policy: TierPolicy, seats: int = 1) -> int:
    """Monthly included credits of a tier or plan: per seat times seats for a per-seat plan."""
    return policy.included_nanousd * (seats if policy.per_seat else 1)


class AccountStore:
    """The account operations, on billing's tables."""

    def __init__(
        self, engine: Engine, settings: BillingSettings, clock: Callable[[], dt.datetime] | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock or utcnow
        ttl_s = settings.token_cache_ttl_s
        self._tokens: TtlCache[Caller] = TtlCache(ttl_s, TOKEN_CACHE_ENTRIES, self._clock_s)
        self._unknown_tokens: TtlCache[bool] = TtlCache(ttl_s, UNKNOWN_TOKEN_CACHE_ENTRIES, self._clock_s)
        self._policies: TtlCache[BilledAccount | str] = TtlCache(ttl_s, POLICY_CACHE_ENTRIES, self._clock_s)

    def _clock_s(self) -> float:
        return self.clock().timestamp()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction; once committed, this store's caches are cleared (the change is seen at once)."""
        try:
            with write_session(self.engine) as s:
                yield s
        finally:
            self.forget_cached()

    def forget_cached(self) -> None:
        """Drop every cached token and policy."""
        self._tokens.clear()
        self._unknown_tokens.clear()
        self._policies.clear()

    # --- helpers

    def _user(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name)) if NAME_RE.fullmatch(name) else None
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user

    def _org(self, s: Session, name: str) -> Org:
        org = s.scalar(select(Org).where(Org.name == name)) if NAME_RE.fullmatch(name) else None
        if org is None:
            raise NotFound(f"no organization named {name!r}")
        return org

    def _name_free(self, s: Session, name: str) -> None:
        # Users and organizations share one namespace, as on the Hub.
        if s.scalar(select(User.id).where(User.name == name)) is not None:
            raise Conflict(f"the name {name!r} is taken by a user")
        if s.scalar(select(Org.id).where(Org.name == name)) is not None:
            raise Conflict(f"the name {name!r} is taken by an organization")

    def _check_tier(self, tier: str) -> None:
        if tier not in self.settings.user_tiers:
            raise InvalidRequest(f"tier: {tier!r} is not one of {', '.join(self.settings.user_tiers)}")

    def _check_plan(self, plan: str) -> None:
        if plan not in self.settings.org_plans:
            raise InvalidRequest(f"plan: {plan!r} is not one of {', '.join(self.settings.org_plans)}")

    @staticmethod
    def _check_limit(limit_nanousd: int | None) -> None:
        if limit_nanousd is not None and (
            not isinstance(limit_nanousd, int) or not 0 <= limit_nanousd <= MAX_NANOUSD
        ):
            raise InvalidRequest(
                f"spending_limit_nanousd: must be a whole number of nano-USD, 0 to {MAX_NANOUSD} (the ledger's range)"
            )

    @staticmethod
    def _check_seats(seats: int) -> None:
        if not isinstance(seats, int) or not 1 <= seats <= MAX_SEATS:
            raise InvalidRequest(f"seats: must be 1 to {MAX_SEATS:,}")

    # --- users and organizations

    def create_user(self, name: str, tier: str | None = None, *, is_admin: bool = False) -> None:
        """Create a user with a tier (the default tier when None)."""
        check_name(name)
        tier = tier or self.settings.default_user_tier
        self._check_tier(tier)
        with self._write() as s:
            self._name_free(s, name)
            s.add(User(name=name, tier=tier, is_admin=is_admin, created_at=self.clock()))

    def set_tier(self, name: str, tier: str) -> None:
        """Move a user to another tier (free, pro)."""
        self._check_tier(tier)
        with self._write() as s:
            self._user(s, name).tier = tier

    def set_admin(self, name: str, is_admin: bool) -> None:
        """Make a user a server administrator (admin API), or not."""
        with self._write() as s:
            self._user(s, name).is_admin = is_admin

    def create_org(
        self,
        name: str,
        *,
        seats: int = 1,
        plan: str | None = None,
        enterprise: bool = False,
        spending_limit_nanousd: int | None = None,
    ) -> None:
        """Create an organization; `enterprise=True` is the plan "enterprise"."""
        check_name(name)
        plan = plan or ("enterprise" if enterprise else "free")
        self._check_plan(plan)
        self._check_seats(seats)
        self._check_limit(spending_limit_nanousd)
        with self._write() as s:
            self._name_free(s, name)
            s.add(
                Org(
                    name=name,
                    plan=plan,
                    seats=seats,
                    spending_limit_nanousd=spending_limit_nanousd,
                    created_at=self.clock(),
                )
            )

    def set_plan(self, org: str, *, plan: str | None = None, seats: int | None = None) -> None:
        """Change an organization's plan and/or seats."""
        if plan is not None:
            self._check_plan(plan)
        if seats is not None:
            self._check_seats(seats)
        with self._write() as s:
            o = self._org(s, org)
            if plan is not None:
                o.plan = plan
            if seats is not None:
                o.seats = seats

    def add_member(self, org: str, user: str, *, admin: bool = False) -> None:
        """Add a user to an organization (or change their admin flag)."""
        with self._write() as s:
            o, u = self._org(s, org), self._user(s, user)
            member = s.get(OrgMember, (o.id, u.id))
            if member is None:
                s.add(OrgMember(org_id=o.id, user_id=u.id, is_admin=admin))
            else:
                member.is_admin = admin

    def remove_member(self, org: str, user: str) -> None:
        """Remove a user from an organization."""
        with self._write() as s:
            o, u = self._org(s, org), self._user(s, user)
            member = s.get(OrgMember, (o.id, u.id))
            if member is None:
                raise NotFound(f"{user!r} is not a member of {org!r}")
            s.delete(member)

    def set_spending_limit(self, account: str, limit_nanousd: int | None) -> None:
        """Set (or clear, with None) an account's monthly pay-as-you-go limit."""
        self._check_limit(limit_nanousd)
        with self._write() as s:
            target = s.scalar(select(Org).where(Org.name == account)) or s.scalar(
                select(User).where(User.name == account)
            )
            if target is None:
                raise NotFound(f"no account named {account!r}")
            target.spending_limit_nanousd = limit_nanousd

    def disable_model(self, org: str, model_id: str) -> None:
        """Refuse requests for `model_id` billed to `org`."""
        if not isinstance(model_id, str) or len(model_id) > 200 or not MODEL_ID_RE.fullmatch(model_id):
            raise InvalidRequest(f"model_id: {model_id!r} is not a model id (ORG/NAME)")
        with self._write() as s:
            o = self._org(s, org)
            if s.get(DisabledModel, (o.id, model_id.lower())) is None:
                s.add(DisabledModel(org_id=o.id, model_id=model_id.lower()))

    def enable_model(self, org: str, model_id: str) -> None:
        """Allow `model_id` for `org` again."""
        with self._write() as s:
            o = self._org(s, org)
            s.execute(
                delete(DisabledModel).where(
                    DisabledModel.org_id == o.id, DisabledModel.model_id == model_id.lower()
                )
            )

    # --- tokens

    def issue_token(self, user: str, label: str = "") -> NewToken:
        """Issue a token for `user`; the secret is returned once and only its hash is stored."""
        token = new_token(self.settings.token_prefix)
        token_id = new_token_id()
        with self._write() as s:
            u = self._user(s, user)
            s.add(
                Token(
                    id=token_id,
                    user_id=u.id,
                    token_sha256=token_sha256(token),
                    hint=token_hint(token, self.settings.token_prefix),
                    label=check_label(label),
                    created_at=self.clock(),
                )
            )
        return NewToken(token_id=token_id, user=user, token=token)

    def revoke_token(self, token_id: str) -> None:
        """Revoke a token by its id; it is refused from the next request on."""
        with self._write() as s:
            tok = s.get(Token, token_id)
            if tok is None:
                raise NotFound(f"no token with id {token_id!r}")
            if tok.revoked_at is None:
                tok.revoked_at = self.clock()

    def token_owner(self, token_id: str) -> str:
        """The user a token id belongs to."""
        with read_session(self.engine) as s:
            row = s.execute(
                select(User.name).join(Token, Token.user_id == User.id).where(Token.id == token_id)
            ).first()
        if row is None:
            raise NotFound(f"no token with id {token_id!r}")
        return row[0]

    def resolve_token(self, token: str, *, cached: bool = True) -> Caller:
        """The user a token belongs to; Unauthorized when unknown or revoked.

        `cached`: answer from the token cache (admission) when it has the token; False asks the database (the
        account API, so a revoked admin token is refused everywhere at once)."""
        key = token_sha256(token)
        if cached:
            hit = self.cached_caller(token, key)
            if hit is not None:
                return hit
        with read_session(self.engine) as s:
            row = s.execute(
                select(User.name, User.tier, User.is_admin, Token.id, Token.revoked_at)
                .join(Token, Token.user_id == User.id)
                .where(Token.token_sha256 == key)
            ).first()
        if row is None or row.revoked_at is not None:
            self._unknown_tokens.put(key, True)
            raise Unauthorized(INVALID_TOKEN)
        caller = Caller(name=row.name, tier=row.tier, is_admin=row.is_admin, token_id=row.id)
        self._tokens.put(key, caller)
        return caller

    def cached_caller(self, token: str, key: str | None = None) -> Caller | None:
        """The user a token belongs to from the cache only: None when it is not cached; Unauthorized when it is
        cached as unknown or revoked."""
        key = key or token_sha256(token)
        hit = self._tokens.get(key)
        if not missing(hit):
            return hit  # type: ignore[return-value]
        if not missing(self._unknown_tokens.get(key)):
            raise Unauthorized(INVALID_TOKEN)
        return None

    # --- the read side of admission

    def billed_account(
        self, caller: Caller, bill_to: str | None, model_id: str, *, cached: bool = True
    ) -> BilledAccount:
        """The account to bill: the caller, or the X-HF-Bill-To organization when the caller may bill it.

        `cached`: answer (or refuse, 403) from the policy cache when it has the answer."""
        key = self._policy_key(caller, bill_to, model_id)
        if cached:
            hit = self.cached_billed_account(caller, bill_to, model_id)
            if hit is not None:
                return hit
        try:
            account = self._billed_account(caller, bill_to, model_id)
        except Forbidden as refused:
            self._policies.put(key, refused.message)
            raise
        self._policies.put(key, account)
        return account

    def cached_billed_account(
        self, caller: Caller, bill_to: str | None, model_id: str
    ) -> BilledAccount | None:
        """`billed_account` from the cache only: None when it is not cached; Forbidden when cached as refused."""
        hit = self._policies.get(self._policy_key(caller, bill_to, model_id))
        if isinstance(hit, str):
            raise Forbidden(hit)
        return hit if isinstance(hit, BilledAccount) else None

    @staticmethod
    def _policy_key(caller: Caller, bill_to: str | None, model_id: str) -> tuple[str, str | None, str | None]:
        if not bill_to or bill_to == caller.name:
            return (caller.name, None, None)  # the caller's own account: the same for every model
        return (caller.name, bill_to, model_id.lower())

    def _billed_account(self, caller: Caller, bill_to: str | None, model_id: str) -> BilledAccount:
        with read_session(self.engine) as s:
            if not bill_to or bill_to == caller.name:
                u = self._user(s, caller.name)
                policy = self.settings.user_tiers.get(u.tier)
                if policy is None:
                    raise Forbidden(f"Your account's tier {u.tier!r} is not offered here")
                return BilledAccount(
                    u.name,
                    "user",
                    u.tier,
                    included_for(policy),
                    policy.pay_as_you_go,
                    u.spending_limit_nanousd,
                )
            row = s.execute(
                select(Org)
                .join(OrgMember, OrgMember.org_id == Org.id)
                .join(User, User.id == OrgMember.user_id)
                .where(Org.name == bill_to, User.name == caller.name)
            ).scalar_one_or_none()
            if row is None:
                raise Forbidden(f"You cannot bill the organization {bill_to!r}: you are not a member of it")
            plan = self.settings.org_plans.get(row.plan)
            if plan is None or not plan.billable:
                raise Forbidden(
                    f"The organization {bill_to!r} is not on a plan that can be billed for inference"
                    " (an Enterprise plan is needed)"
                )
            disabled = s.get(DisabledModel, (row.id, model_id.lower()))
            if disabled is not None:
                raise Forbidden(f"The model {model_id} is disabled for the organization {bill_to!r}")
            return BilledAccount(
                row.name,
                "org",
                row.plan,
                included_for(plan, row.seats),
                plan.pay_as_you_go,
                row.spending_limit_nanousd,
            )

    def account_kind(self, name: str) -> str:
        """'user' or 'org'; NotFound otherwise."""
        with read_session(self.engine) as s:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                return "user"
            if s.scalar(select(Org.id).where(Org.name == name)) is not None:
                return "org"
        raise NotFound(f"no account named {name!r}")

    def account_policy(self, name: str) -> BilledAccount:
        """The billing view of an account (for reports), without membership checks."""
        with read_session(self.engine) as s:
            u = s.scalar(select(User).where(User.name == name))
            if u is not None:
                p = self.settings.user_tiers.get(u.tier) or TierPolicy(
                    included_nanousd=0, pay_as_you_go=False
                )
                return BilledAccount(
                    u.name, "user", u.tier, included_for(p), p.pay_as_you_go, u.spending_limit_nanousd
                )
            o = self._org(s, name)
            p = self.settings.org_plans.get(o.plan) or TierPolicy(included_nanousd=0, pay_as_you_go=False)
            return BilledAccount(
                o.name, "org", o.plan, included_for(p, o.seats), p.pay_as_you_go, o.spending_limit_nanousd
            )

    def is_org_admin(self, user: str, org: str) -> bool:
        """Whether `user` administers `org`."""
        with read_session(self.engine) as s:
            row = s.execute(
                select(OrgMember.is_admin)
                .join(Org, Org.id == OrgMember.org_id)
                .join(User, User.id == OrgMember.user_id)
                .where(Org.name == org, User.name == user)
            ).first()
        return bool(row and row[0])

    def org_members(self, org: str) -> list[str]:
        """The names of an organization's members."""
        with read_session(self.engine) as s:
            o = self._org(s, org)
            return list(
                s.scalars(
                    select(User.name)
                    .join(OrgMember, OrgMember.user_id == User.id)
                    .where(OrgMember.org_id == o.id)
                    .order_by(User.name)
                )
            )

    def memberships(self, user: str) -> list[tuple[str, bool]]:
        """The organizations `user` belongs to, as (org, is_admin), by name (the billing page's account list)."""
        with read_session(self.engine) as s:
            rows = s.execute(
                select(Org.name, OrgMember.is_admin)
                .join(OrgMember, OrgMember.org_id == Org.id)
                .join(User, User.id == OrgMember.user_id)
                .where(User.name == user)
                .order_by(Org.name)
            ).all()
        return [(name, bool(admin)) for name, admin in rows]

    def disabled_models(self, org: str) -> list[str]:
        """The models disabled for `org` (lower-case ids), sorted; NotFound for an unknown organization."""
        with read_session(self.engine) as s:
            o = self._org(s, org)
            return sorted(s.scalars(select(DisabledModel.model_id).where(DisabledModel.org_id == o.id)))

    def count_users(self) -> int:
        """How many users exist (bootstrap runs only on an empty database)."""
        with read_session(self.engine) as s:
            return int(s.scalar(select(func.count(User.id))) or 0)

    def list_accounts(self) -> list[AccountInfo]:
        """Every user and organization with members, disabled models and token handles (never secrets)."""
        out: list[AccountInfo] = []
        with read_session(self.engine) as s:
            names = {u.id: u.name for u in s.scalars(select(User))}
            for u in s.scalars(select(User).order_by(User.name)):
                toks = [
                    {"id": t.id, "hint": t.hint, "label": t.label, "revoked": t.revoked_at is not None}
                    for t in s.scalars(select(Token).where(Token.user_id == u.id).order_by(Token.created_at))
                ]
                out.append(
                    AccountInfo(
                        u.name, "user", u.tier, u.spending_limit_nanousd, is_admin=u.is_admin, tokens=toks
                    )
                )
            for o in s.scalars(select(Org).order_by(Org.name)):
                members = [
                    {"user": names[m.user_id], "admin": m.is_admin}
                    for m in s.scalars(select(OrgMember).where(OrgMember.org_id == o.id))
                ]
                members.sort(key=lambda m: str(m["user"]))
                disabled = sorted(
                    s.scalars(select(DisabledModel.model_id).where(DisabledModel.org_id == o.id))
                )
                out.append(
                    AccountInfo(
                        o.name,
                        "org",
                        o.plan,
                        o.spending_limit_nanousd,
                        seats=o.seats,
                        members=members,
                        disabled_models=disabled,
                    )
                )
        return out
