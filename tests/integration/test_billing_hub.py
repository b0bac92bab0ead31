"""Routed Hugging Face tokens and model-mapping sync, against the local Hub stand-in (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import datetime as dt

import pytest
from typer.testing import CliRunner

from billing.config import BillingSettings
from billing.errors import Forbidden, HubUnavailable, Unauthorized
from billing.hub import Mapping, PartnerApi
from billing.hub_sync import apply_sync, plan_sync
from billing.service import BillingService
from models.catalog import parse_catalog

WHEN = dt.datetime(2026, 4, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def routed(tmp_path, hub_standin):
    settings = BillingSettings(
        mode="tokens", accept_hf_tokens=True, hub_url=hub_standin.url, hub_whoami_cache_s=60
    )
    svc = BillingService(settings, f"sqlite:///{tmp_path}/hub.db")
    yield svc, hub_standin
    svc.close()


def test_routed_token_is_attributed_to_the_hf_user_or_org(routed):
    svc, hub = routed
    hub.add_token("hf_julien", "julien", orgs=["huggingface", "acme"])
    adm = svc.admit("hf_julien", None, "org/m", 10**7, WHEN)
    assert (adm.kind, adm.user, adm.billed_account, adm.reservation_id) == (
        "hf-routed",
        "hf:julien",
        "hf:julien",
        None,
    )
    adm = svc.admit("hf_julien", "acme", "org/m", 10**7, WHEN)
    assert adm.billed_account == "hf:acme" and adm.user == "hf:julien"
    with pytest.raises(Forbidden):
        svc.admit("hf_julien", "not-my-org", "org/m", 10**7, WHEN)
    # no included-credit checks: routed traffic is billed by Hugging Face from the cost look-up
    for _ in range(30):
        a = svc.admit("hf_julien", None, "org/m", 10**9, WHEN)
        svc.settle(a, 10**9)  # a no-op: nothing touches our accounts' credits
    assert svc.spend.committed_nanousd("hf:julien", "2026-04") == 0


def test_whoami_answers_are_cached_briefly(routed):
    svc, hub = routed
    now = [1000.0]
    svc.whoami.monotonic = lambda: now[0]
    hub.add_token("hf_ann", "ann")
    for _ in range(5):
        svc.admit("hf_ann", None, "org/m", 1, WHEN)
    assert hub.calls[("GET", "/api/whoami-v2")] == 1
    now[0] += 61  # past the cache's 60 s
    svc.admit("hf_ann", None, "org/m", 1, WHEN)
    assert hub.calls[("GET", "/api/whoami-v2")] == 2


def test_unknown_hf_token_is_401_and_hub_outage_is_503(routed):
    svc, hub = routed
    with pytest.raises(Unauthorized) as err:
        svc.admit("hf_unknown", None, "org/m", 1, WHEN)
    assert err.value.status_code == 401
    with pytest.raises(Unauthorized):  # answered from the short negative cache
        svc.admit("hf_unknown", None, "org/m", 1, WHEN)
    assert hub.calls[("GET", "/api/whoami-v2")] == 1
    hub.fail_whoami = True
    with pytest.raises(HubUnavailable) as err:
        svc.admit("hf_other", None, "org/m", 1, WHEN)
    assert err.value.status_code == 503


def test_hf_tokens_are_refused_when_routing_is_off(tmp_path, hub_standin):
    hub_standin.add_token("hf_ann", "ann")
    svc = BillingService(
        BillingSettings(mode="tokens", hub_url=hub_standin.url), f"sqlite:///{tmp_path}/x.db"
    )
    with pytest.raises(Unauthorized):
        svc.admit("hf_ann", None, "org/m", 1, WHEN)
    assert hub_standin.calls[("GET", "/api/whoami-v2")] == 0
    svc.close()


CATALOG = parse_catalog(
    [
        {"id": "local/tiny-flux", "task": "text-to-image", "source": {"path": "x"}},
        {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "task": "text-generation", "source": {"path": "y"}},
        {
            "id": "sentence-transformers/all-MiniLM-L6-v2",
            "task": "feature-extraction",
            "source": {"path": "z"},
        },
        {"id": "black-forest-labs/FLUX.1-dev", "task": "text-to-image", "source": {"repo_id": "b/f"}},
    ]
)


def test_mapping_sync_dry_run_apply_and_status(hub_standin):
    api = PartnerApi(hub_standin.url, hub_standin.provider, hub_standin.partner_token)
    hub_standin.mappings = {
        "text-to-image": {"old/model": {"providerId": "old/model", "status": "live", "id": "1"}}
    }
    plan = plan_sync(CATALOG, api.list(), exclude=["local/*"])
    assert [(a.action, a.hf_model) for a in plan] == [
        ("register", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("register", "sentence-transformers/all-MiniLM-L6-v2"),
        ("register", "black-forest-labs/FLUX.1-dev"),
        ("extra", "old/model"),
    ]
    assert plan[0].task == "conversational" and plan[0].status == "staging"
    assert (
        hub_standin.calls[("POST", f"/api/partners/{hub_standin.provider}/models")] == 0
    )  # planning writes nothing
    assert apply_sync(api, plan) == 3
    assert (
        "conversational",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "staging",
    ) in hub_standin.mapping_list()
    assert all(a.action in ("ok", "extra") for a in plan_sync(CATALOG, api.list(), exclude=["local/*"]))
    # go live: only the status flips (PUT .../status)
    live = plan_sync(CATALOG, api.list(), exclude=["local/*"], status="live")
    assert [a.action for a in live] == ["status", "status", "status", "extra"]
    apply_sync(api, live)
    assert hub_standin.calls[("PUT", f"/api/partners/{hub_standin.provider}/models/status")] == 3
    assert {s for _, hf, _, s in hub_standin.mapping_list() if hf != "old/model"} == {"live"}
    # a mapping that drifted (another task) is updated and keeps its status
    api.register(Mapping("text-generation", "HuggingFaceTB/SmolLM2-135M-Instruct", "other", "live"))
    plan = plan_sync(CATALOG, api.list(), exclude=["local/*"])
    drift = [a for a in plan if a.action == "update"]
    assert len(drift) == 1 and drift[0].status == "live" and "becomes" in drift[0].describe()
    api.close()


def test_partner_api_refuses_a_bad_token(hub_standin):
    from billing.errors import HubError

    api = PartnerApi(hub_standin.url, hub_standin.provider, "hf_wrong")
    with pytest.raises(HubError, match="401"):
        api.register(Mapping("text-to-image", "a/b", "a/b", "staging"))
    api.close()


def test_hfi_hub_sync_command(hub_standin, tmp_path, monkeypatch):
    import typer

    from billing.cli import register

    app = typer.Typer()
    register(app)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "models:\n"
        "  - {id: local/tiny, task: text-classification, source: {path: a}}\n"
        "  - {id: org/embed, task: feature-extraction, source: {path: b}}\n"
    )
    monkeypatch.delenv("HFI_CONFIG", raising=False)
    args = [
        "hub",
        "sync",
        "--catalog",
        str(catalog),
        "--hub-url",
        hub_standin.url,
        "--provider",
        hub_standin.provider,
        "--token",
        hub_standin.partner_token,
    ]
    runner = CliRunner()
    dry = runner.invoke(app, args)
    assert dry.exit_code == 0, dry.output
    assert "register org/embed (feature-extraction)" in dry.output and "dry run: 1 change" in dry.output
    assert hub_standin.mapping_list() == []
    done = runner.invoke(app, [*args, "--apply"])
    assert done.exit_code == 0 and "applied 1 change" in done.output
    assert hub_standin.mapping_list() == [("feature-extraction", "org/embed", "org/embed", "staging")]
    again = runner.invoke(app, args)
    assert "ok       org/embed" in again.output and "dry run: 0 change" in again.output
    bad = runner.invoke(app, [*args[:-1], "hf_wrong", "--apply", "--status", "live"])
    assert bad.exit_code == 1 and "401" in bad.output
