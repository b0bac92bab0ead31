"""`hfi accounts ...` (users, organizations, tokens, limits, usage) and `hfi hub sync` (model mappings).

Also `bootstrap(database_url)`, which `hfi serve` calls on first start in tokens mode. Heavy imports stay
inside the commands so that `hfi --help` stays fast.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from core.money import NANOUSD_PER_USD

if TYPE_CHECKING:
    import typer

    from billing.config import BillingSettings
    from billing.service import BillingService

DB_HELP = (
    "the database (default: $HFI_DATABASE_URL, then $HFI_CONFIG's metering.database_url, then local SQLite)"
)


def load_settings() -> BillingSettings:
    """Billing settings from $HFI_CONFIG's `billing:` section (tiers, Hub URL, ...) and $HFI_BILLING_MODE."""
    from billing.config import BillingSettings
    from core.settings import settings_data

    data = settings_data(variables=("HFI_BILLING_MODE",), secret_files=False)
    return BillingSettings.model_validate(data.get("billing") or {})


def resolve_database_url(option: str | None) -> str:
    """--database-url, else $HFI_DATABASE_URL, else the config file's, else the metering default."""
    from core.settings import setting
    from metering.config import DEFAULT_DATABASE_URL

    return setting("metering.database_url", option, default=DEFAULT_DATABASE_URL)


def parse_usd(value: str) -> int:
    """An exact USD amount ("2.50") in nano-USD; at most 9 decimal places, never negative."""
    try:
        amount = Decimal(value.strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {value!r}") from None
    nano = amount * NANOUSD_PER_USD
    if not amount.is_finite() or nano != nano.to_integral_value() or amount < 0:
        raise ValueError(f"not a non-negative USD amount with at most 9 decimals: {value!r}")
    return int(nano)


def bootstrap(
    database_url: str, settings: BillingSettings | None = None, *, user_tier: str = "pro"
) -> tuple[str, str] | None:
    """On a database without users: create `admin` (server admin) and `user`, return their new tokens once.

    Returns None when users already exist (not the first start). `hfi serve` prints the two tokens.
    """
    from billing.config import BillingSettings
    from billing.errors import Conflict
    from billing.service import BillingService

    svc = BillingService(settings or BillingSettings(mode="tokens"), database_url)
    try:
        if svc.accounts.count_users() > 0:
            return None
        try:
            svc.accounts.create_user(
                "admin", "pro" if "pro" in svc.settings.user_tiers else None, is_admin=True
            )
            svc.accounts.create_user("user", user_tier if user_tier in svc.settings.user_tiers else None)
        except Conflict:  # another replica bootstrapped at the same moment
            return None
        admin = svc.accounts.issue_token("admin", label="bootstrap").token
        user = svc.accounts.issue_token("user", label="bootstrap").token
        return admin, user
    finally:
        svc.close()


def _service(database_url: str | None) -> BillingService:
    from billing.service import BillingService

    return BillingService(load_settings(), resolve_database_url(database_url))


def _run(database_url: str | None, action) -> Any:
    """Run `action(service)`; a billing error becomes a clean message and exit code 1."""
    import typer

    from billing.errors import BillingError

    svc = _service(database_url)
    try:
        result = action(svc)
    except BillingError as err:
        _audit_command(svc, 1)
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(1) from None
    else:
        _audit_command(svc, 0)
        return result
    finally:
        svc.close()


# Commands that change nothing: not written to the audit log.
READ_ONLY_COMMANDS = frozenset({"list", "usage", "reconcile", "audit"})


def _current_command() -> Any:
    """The running command's click context (Typer carries its own copy of click since 0.2x), or None."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # an older Typer, on click itself
        from click import get_current_context
    return get_current_context(silent=True)


def _audit_command(svc: BillingService, status: int) -> None:
    """Write the running `hfi` command that changes something to the audit log (status 0 done, 1 refused)."""
    import getpass
    import logging
    import socket

    ctx = _current_command()
    if ctx is None or ctx.info_name in READ_ONLY_COMMANDS:
        return
    from billing.audit import record

    group = ctx.parent.info_name if ctx.parent is not None else ""
    target = " ".join(
        f"{k}={v}" for k, v in ctx.params.items() if k != "database_url" and v not in (None, "")
    )
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    try:
        svc.ensure_schema()
        record(
            svc.engine,
            actor=f"cli:{user}",
            action=f"hfi {group} {ctx.info_name}".replace("  ", " "),
            target=target or None,
            status=status,
            source=f"cli {socket.gethostname()}",
        )
    except Exception:  # the command's outcome stands; the lost audit line is said
        logging.getLogger("billing.cli").warning("audit: could not record %s", ctx.info_name, exc_info=True)


def _usd(nanousd: int | None) -> str:
    from core.money import usd_str

    return "none" if nanousd is None else "$" + usd_str(nanousd)


def register(app: typer.Typer) -> None:
    """Add `accounts`, `billing` and `hub` to the `hfi` command line."""
    import typer

    accounts = typer.Typer(no_args_is_help=True, help="Users, organizations, tokens, limits and usage.")
    billing = typer.Typer(no_args_is_help=True, help="Housekeeping of reservations: sweep, prune.")
    hub = typer.Typer(no_args_is_help=True, help="The Hugging Face Hub: model mappings of this provider.")
    app.add_typer(accounts, name="accounts")
    app.add_typer(billing, name="billing")
    app.add_typer(hub, name="hub")
    _register_accounts(accounts)
    _register_tokens_and_limits(accounts)
    _register_views(accounts)
    _register_audit(accounts)
    _register_housekeeping(billing)
    _register_hub(hub)


def _db_option():
    import typer

    return typer.Option(None, "--database-url", help=DB_HELP)


def _register_accounts(accounts: typer.Typer) -> None:
    import typer

    @accounts.command("create-user")
    def create_user(
        name: str,
        tier: str = typer.Option(None, "--tier", help="free or pro (default: free)"),
        admin: bool = typer.Option(False, "--admin", help="a server administrator"),
        database_url: str = _db_option(),
    ) -> None:
        """Create a user."""
        _run(database_url, lambda s: s.accounts.create_user(name, tier, is_admin=admin))
        typer.echo(f"created user {name}")

    @accounts.command("create-org")
    def create_org(
        name: str,
        seats: int = typer.Option(1, "--seats"),
        enterprise: bool = typer.Option(False, "--enterprise", help="the enterprise plan (billable)"),
        plan: str = typer.Option(None, "--plan", help="a plan from the settings (wins over --enterprise)"),
        spending_limit: str = typer.Option(None, "--spending-limit", help="monthly PAYG limit, USD"),
        database_url: str = _db_option(),
    ) -> None:
        """Create an organization."""
        limit = _limit(spending_limit)
        _run(
            database_url,
            lambda s: s.accounts.create_org(
                name, seats=seats, plan=plan, enterprise=enterprise, spending_limit_nanousd=limit
            ),
        )
        typer.echo(f"created organization {name}")

    @accounts.command("set-plan")
    def set_plan(
        org: str,
        plan: str = typer.Option(None, "--plan"),
        seats: int = typer.Option(None, "--seats"),
        database_url: str = _db_option(),
    ) -> None:
        """Change an organization's plan or seats."""
        _run(database_url, lambda s: s.accounts.set_plan(org, plan=plan, seats=seats))
        typer.echo(f"updated {org}")

    @accounts.command("add-member")
    def add_member(
        org: str,
        user: str,
        admin: bool = typer.Option(False, "--admin", help="an org admin"),
        database_url: str = _db_option(),
    ) -> None:
        """Add a user to an organization (again, to change --admin)."""
        _run(database_url, lambda s: s.accounts.add_member(org, user, admin=admin))
        typer.echo(f"{user} is a{'n admin' if admin else ' member'} of {org}")

    @accounts.command("remove-member")
    def remove_member(org: str, user: str, database_url: str = _db_option()) -> None:
        """Remove a user from an organization."""
        _run(database_url, lambda s: s.accounts.remove_member(org, user))
        typer.echo(f"removed {user} from {org}")

    @accounts.command("set-tier")
    def set_tier(user: str, tier: str, database_url: str = _db_option()) -> None:
        """Set a user's tier (free, pro)."""
        _run(database_url, lambda s: s.accounts.set_tier(user, tier))
        typer.echo(f"{user} is now {tier}")


def _register_tokens_and_limits(accounts: typer.Typer) -> None:
    import typer

    @accounts.command("issue-token")
    def issue_token(
        user: str, label: str = typer.Option("", "--label"), database_url: str = _db_option()
    ) -> None:
        """Issue a token for a user. It is printed once: store it now."""
        tok = _run(database_url, lambda s: s.accounts.issue_token(user, label))
        typer.echo(f"token id: {tok.token_id} (for revoke-token)", err=True)
        typer.echo(tok.token)

    @accounts.command("revoke-token")
    def revoke_token(token_id: str, database_url: str = _db_option()) -> None:
        """Revoke a token by its id (see `list`)."""
        _run(database_url, lambda s: s.accounts.revoke_token(token_id))
        typer.echo(f"revoked {token_id}")

    @accounts.command("set-spending-limit")
    def set_spending_limit(
        account: str,
        amount_usd: str = typer.Argument(..., help="USD, or 'none'"),
        database_url: str = _db_option(),
    ) -> None:
        """Set an account's monthly pay-as-you-go limit in USD ('none' removes it)."""
        limit = _limit(amount_usd)
        _run(database_url, lambda s: s.accounts.set_spending_limit(account, limit))
        typer.echo(f"spending limit of {account}: {_usd(limit)}")

    @accounts.command("disable-model")
    def disable_model(org: str, model_id: str, database_url: str = _db_option()) -> None:
        """Refuse a model for requests billed to an organization."""
        _run(database_url, lambda s: s.accounts.disable_model(org, model_id))
        typer.echo(f"{model_id} is disabled for {org}")

    @accounts.command("enable-model")
    def enable_model(org: str, model_id: str, database_url: str = _db_option()) -> None:
        """Allow a disabled model again."""
        _run(database_url, lambda s: s.accounts.enable_model(org, model_id))
        typer.echo(f"{model_id} is enabled for {org}")


def _register_views(accounts: typer.Typer) -> None:
    import typer

    @accounts.command("list")
    def list_accounts(
        as_json: bool = typer.Option(False, "--json"), database_url: str = _db_option()
    ) -> None:
        """Users and organizations (tokens by id and hint, never the secret)."""
        from dataclasses import asdict

        infos = _run(database_url, lambda s: s.accounts.list_accounts())
        if as_json:
            typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
            return
        for i in infos:
            line = f"{i.kind:4} {i.name:24} {i.tier_or_plan:10} limit={_usd(i.spending_limit_nanousd)}"
            if i.kind == "org":
                members = ", ".join(f"{m['user']}{'*' if m['admin'] else ''}" for m in i.members)
                line += f" seats={i.seats} members=[{members}] disabled={i.disabled_models}"
            else:
                live = [t["id"] for t in i.tokens if not t["revoked"]]
                line += f"{' admin' if i.is_admin else ''} tokens={live}"
            typer.echo(line)

    @accounts.command("usage")
    def usage(
        account: str = typer.Argument(None, help="the account (default: every account together)"),
        month: str = typer.Option(None, "--month", help="YYYY-MM (default: this month)"),
        fmt: str = typer.Option("json", "--format", help="json or csv"),
        limit: int = typer.Option(None, "--limit", help="charges a page (default 1000, at most 10000)"),
        cursor: str = typer.Option(None, "--cursor", help="the next page: next_cursor of the previous one"),
        every: bool = typer.Option(False, "--all", help="csv: every charge of the month, page after page"),
        database_url: str = _db_option(),
    ) -> None:
        """An account's month (the usage API's report): included credits used, pay-as-you-go, by model, profile
        and day, a page of charges. No account: every account's month, by account."""
        _check_usage_options(fmt, every)
        _run(database_url, lambda s: _print_usage(s, account, month, fmt, limit, cursor, every))

    @accounts.command("reconcile")
    def reconcile_cmd(
        month: str = typer.Option(None, "--month", help="YYYY-MM (default: this month)"),
        database_url: str = _db_option(),
    ) -> None:
        """Check billing's settled costs against the metering ledger, request by request (exit 1 on a mismatch)."""
        import datetime as dt

        month = month or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")
        rec = _run(database_url, lambda s: s.reconcile(month))
        typer.echo(
            f"{month}: {rec.matched} matched; billing {_usd(rec.billing_total_nanousd)}, "
            f"ledger {_usd(rec.ledger_total_nanousd)}"
        )
        for rid in rec.missing_in_ledger:
            typer.echo(f"missing in the ledger: {rid}")
        for rid in rec.missing_in_billing:
            typer.echo(f"missing in billing: {rid}")
        for rid, ours, theirs in rec.different:
            typer.echo(f"different: {rid}: billing {ours}, ledger {theirs} nano-USD")
        if not rec.ok:
            raise typer.Exit(1)


def _register_audit(accounts: typer.Typer) -> None:
    import typer

    @accounts.command("audit")
    def audit(
        limit: int = typer.Option(100, "--limit", help="entries, most recent first (at most 10000)"),
        actor: str = typer.Option(None, "--actor", help="only this actor: an account, (admin), cli:USER"),
        since: str = typer.Option(None, "--since", help="only entries from this ISO date or time (UTC)"),
        as_json: bool = typer.Option(False, "--json"),
        database_url: str = _db_option(),
    ) -> None:
        """The audit log of admin actions: who did what, when, from where, and how it was answered."""
        import datetime as dt

        from billing.audit import entries

        start = None
        if since:
            try:
                start = dt.datetime.fromisoformat(since)
            except ValueError:
                typer.echo(f"error: --since: not an ISO date or time: {since!r}", err=True)
                raise typer.Exit(2) from None
            start = start if start.tzinfo else start.replace(tzinfo=dt.timezone.utc)

        def listing(s: BillingService) -> list:
            s.ensure_schema()
            return entries(s.engine, since=start, actor=actor, limit=limit)

        lines = _run(database_url, listing)
        if as_json:
            typer.echo(json.dumps([line.as_json() for line in lines], indent=2))
            return
        for line in lines:
            target = f" {line.target}" if line.target else ""
            typer.echo(
                f"{line.at.isoformat(timespec='seconds')} {line.actor:20} {line.status:3} {line.action}{target}"
                f"  ({line.source})"
            )


def _check_usage_options(fmt: str, every: bool) -> None:
    import typer

    if fmt not in ("json", "csv"):
        raise typer.BadParameter("use json or csv", param_hint="--format")
    if every and fmt != "csv":
        raise typer.BadParameter("--all writes csv: add --format csv", param_hint="--all")


def _print_usage(
    svc: BillingService, account: str | None, month: str | None, fmt: str, limit, cursor, every: bool
) -> None:
    """One page of the usage report (its next cursor on stderr), or with `every` the whole month as CSV."""
    import typer

    from billing.accounts import Caller
    from billing.reports import report_csv

    operator = Caller(name="(operator)", tier="", is_admin=True)
    report = svc.usage(operator, account, month, limit=limit, cursor=cursor)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(report_csv(report, total_row=not (every and report["next_cursor"])), nl=False)
    while every and report["next_cursor"]:
        report = svc.usage(operator, account, month, limit=limit, cursor=report["next_cursor"])
        typer.echo(report_csv(report, header=False, total_row=not report["next_cursor"]), nl=False)
    if report["next_cursor"]:
        typer.echo(f"more charges: --cursor {report['next_cursor']}", err=True)


def _register_housekeeping(billing: typer.Typer) -> None:
    import typer

    @billing.command("sweep")
    def sweep(database_url: str = _db_option()) -> None:
        """Settle reservations whose settlement was lost from the ledger's charges; expire stale ones; give back
        the leases of processes that died; adopt the ledger's charges that have no reservation."""
        done = _run(database_url, lambda s: s.sweep_reservations())
        typer.echo(
            f"settled from the ledger: {done.settled_from_ledger}; expired: {done.expired}; "
            f"adopted from the ledger: {done.adopted_from_ledger}; leases given back: {done.leases_reclaimed}"
        )

    @billing.command("prune")
    def prune(
        dry_run: bool = typer.Option(False, "--dry-run", help="count, delete nothing"),
        database_url: str = _db_option(),
    ) -> None:
        """Delete finished reservations older than billing.reservation_retention_days (default 70)."""
        n = _run(database_url, lambda s: s.prune_reservations(dry_run=dry_run))
        typer.echo(f"{'would prune' if dry_run else 'pruned'} {n} reservation(s)")


def _limit(value: str | None) -> int | None:
    import typer

    if value is None or value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return parse_usd(value)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _register_hub(hub: typer.Typer) -> None:
    import typer

    @hub.command("sync")
    def sync(
        apply: bool = typer.Option(False, "--apply", help="make the changes (default: a dry run)"),
        status: str = typer.Option(None, "--status", help="staging or live for every mapping"),
        catalog: str = typer.Option(None, "--catalog", envvar="HFI_CATALOG", help="the model catalog YAML"),
        hub_url: str = typer.Option(None, "--hub-url", help="default: billing.hub_url"),
        provider: str = typer.Option(None, "--provider", help="default: billing.hub_provider"),
        token: str = typer.Option(
            None,
            "--token",
            envvar="HF_TOKEN",
            help="a token with write access to the provider's Hub organization",
        ),
    ) -> None:
        """Register, update and list the catalog's models on the Hub through the partner API."""
        from billing.errors import HubError
        from billing.hub import PartnerApi
        from billing.hub_sync import apply_sync, plan_sync
        from models.catalog import CatalogError, load_catalog

        settings = load_settings()
        try:
            cat = load_catalog(catalog)
        except CatalogError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        api = PartnerApi(hub_url or settings.hub_url, provider or settings.hub_provider, token)
        try:
            plan = plan_sync(cat, api.list(), exclude=settings.hub_sync_exclude, status=status)
            for action in plan:
                typer.echo(action.describe())
            pending = sum(a.action in ("register", "update", "status") for a in plan)
            if not apply:
                typer.echo(f"dry run: {pending} change(s); run with --apply to make them")
                return
            made = apply_sync(api, plan)
            typer.echo(f"applied {made} change(s)")
        except (HubError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        finally:
            api.close()
