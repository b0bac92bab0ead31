"""The front door over HTTP, on the real default models in this process: the admin API needs a token in every mode,
CORS only on inference routes, browsers' cross-origin requests refused, tokens checked before the body is read or
a model is waited for, body caps on every route, rate limits, /metrics and /docs, the audit log, the chat prompt
cap at the ingress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore

CLS = "/models/local/tiny-sentiment"
LLM = "/models/HuggingFaceTB/SmolLM2-135M-Instruct"
ADMIN = "admin-token-for-security-tests"
EVIL = "http://evil.example"


class Recording:
    """The real in-process backend, with a note of each call (what reached the models)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    async def info(self, model_id: str) -> dict[str, Any]:
        self.calls.append(("info", model_id))
        return await self.inner.info(model_id)

    async def run(self, model_id: str, request: Any) -> Any:
        self.calls.append(("run", model_id))
        return await self.inner.run(model_id, request)

    def stream(self, model_id: str, request: Any) -> Any:
        self.calls.append(("stream", model_id))
        return self.inner.stream(model_id, request)


@pytest.fixture
def make_core(model_store, inprocess_backend, tmp_path):
    """A factory of IngressCores over the session's models, each with its own database; closed at the end."""
    cores: list[IngressCore] = []

    def make(**extra: Any) -> IngressCore:
        work = tmp_path / f"core{len(cores)}"
        data: dict[str, Any] = {
            "model_store": str(model_store),
            "offline": True,
            "metering": {"database_url": f"sqlite:///{work}.db", "spool_dir": str(work / "spool")},
        }
        for key, value in extra.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        core = IngressCore(Settings.load(data, env={}), Recording(inprocess_backend))
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.close()


@contextmanager
def client_of(core: IngressCore) -> Iterator[TestClient]:
    with TestClient(create_app(core), raise_server_exceptions=False) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def user_token(core: IngressCore, name: str, tier: str = "pro") -> str:
    core.billing.accounts.create_user(name, tier)
    return core.billing.accounts.issue_token(name).token


# 1. The admin API: a token in every mode; browsers' cross-origin requests refused; CORS on inference only


def test_open_mode_admin_api_needs_a_token_and_refuses_a_web_page(make_core):
    core = make_core(billing={"mode": "open", "admin_token": ADMIN})
    with client_of(core) as c:
        # The issue's reproduction: a page on another origin, no token. It was 200, with every account.
        r = c.get("/admin/accounts", headers={"origin": EVIL})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, r.text
        assert "Cross-origin" in r.json()["error"]
        r = c.get("/admin/accounts")  # no page involved, still no token: nothing in open mode is an admin
        assert r.status_code == 401 and "HFI_ADMIN_TOKEN" in r.json()["error"]
        assert c.get("/admin/accounts", headers=auth(ADMIN)).status_code == 200
        assert c.get("/admin/accounts", headers={**auth(ADMIN), "origin": EVIL}).status_code == 403
        same = c.get("/admin/accounts", headers={**auth(ADMIN), "origin": "http://testserver"})
        assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
        # A cross-site form post (text/plain: no preflight), even with a token the page somehow has: refused, and
        # nothing created.
        form = c.post(
            "/admin/users",
            content=json.dumps({"name": "mallory", "admin": True}),
            headers={**auth(ADMIN), "origin": EVIL, "content-type": "text/plain"},
        )
        assert form.status_code == 403
        names = {a["name"] for a in c.get("/admin/accounts", headers=auth(ADMIN)).json()}
        assert "mallory" not in names
        # fetch() without an Origin header but with the browser's own Sec-Fetch-Site: refused too
        sneaky = c.get("/usage", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"})
        assert sneaky.status_code == 403
        # the laptop keeps working: its own usage without a token, from a terminal
        assert c.get("/usage").status_code == 200


def test_cors_answers_only_on_inference_routes(make_core):
    core = make_core()
    with client_of(core) as c:
        preflight = {"origin": EVIL, "access-control-request-method": "POST"}
        ok = c.options(CLS, headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
        r = c.post(CLS, json={"inputs": "hi"}, headers={"origin": EVIL})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "x-compute-time" in r.headers["access-control-expose-headers"]
        for path in ("/admin/users", "/usage", "/billing/usage", "/billing/requests"):
            refused = c.options(path, headers=preflight)
            assert "access-control-allow-origin" not in refused.headers, path
            got = c.get(path, headers={"origin": EVIL})
            assert got.status_code == 403 and "access-control-allow-origin" not in got.headers, path


# 4. The token before the body and before the wait for a loading model


def _asgi_post(app: Any, path: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    """POST `path` straight through ASGI; (status, what the app did with the connection)."""
    events: list[str] = []
    body = json.dumps({"inputs": "hi"}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (k.encode(), v.encode()) for k, v in {**headers, "content-type": "application/json"}.items()
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        if not events:
            events.append("body read")
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # as a server does: nothing more until the client goes away
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return status[0], events


def test_tokens_mode_checks_the_token_before_reading_the_body_or_waiting_for_the_model(make_core):
    core = make_core(billing={"mode": "tokens"})
    app = create_app(core)
    token = user_token(core, "ann")
    for headers in ({}, auth("hfi_not_a_token"), auth("hf_someone")):
        status, events = _asgi_post(app, CLS, headers)
        assert status == 401, headers
        assert events == [], f"the body was read before the token was refused ({headers})"
    assert core.backend.calls == [], "nothing waited for a model"
    status, events = _asgi_post(app, CLS, auth(token))
    assert (
        status == 200
        and events == ["body read"]
        and core.backend.calls[0] == ("info", "local/tiny-sentiment")
    )


# 4. Body caps on every route


def test_the_body_is_capped_on_admin_and_billing_routes(make_core):
    core = make_core(
        billing={"mode": "tokens", "admin_token": ADMIN}, metering={"provider_secret": "provider-secret"}
    )
    big = b"x" * (100 * 1024)
    with client_of(core) as c:
        r = c.post("/admin/users", content=big, headers={**auth(ADMIN), "content-type": "application/json"})
        assert r.status_code == 413 and "65536" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: capped as it is read
            for _ in range(100):
                yield b"x" * 1024

        r = c.post(
            "/admin/users", content=chunks(), headers={**auth(ADMIN), "content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        ids = json.dumps({"requestIds": ["a" * 36] * 40_000}).encode()  # ~1.6 MB
        r = c.post("/billing/requests", content=ids, headers=auth("provider-secret"))
        assert r.status_code == 413, r.text
        r = c.post("/billing/requests", content=ids, headers=auth("wrong"))
        assert r.status_code == 413  # Content-Length alone decides: nothing was read
        small = c.post("/billing/requests", json={"requestIds": ["nope"]}, headers=auth("provider-secret"))
        assert small.status_code == 200 and small.json() == {"requests": []}
        assert c.post("/admin/users", json={"name": "ok"}, headers=auth(ADMIN)).status_code == 201


# 5. Rate limits per token and per account


def test_rate_limits_per_token_and_per_account_answer_429_with_retry_after_and_ratelimit_fields(make_core):
    limits = {
        "pro": {
            "per_token": {"requests_per_minute": 2},
            "per_account": {"requests_per_minute": 3},
        }
    }
    core = make_core(billing={"mode": "tokens", "rate_limits": limits})
    first = user_token(core, "ann")
    second = core.billing.accounts.issue_token("ann").token
    with client_of(core) as c:
        for _ in range(2):
            r = c.post(CLS, json={"inputs": "hi"}, headers=auth(first))
            assert r.status_code == 200, r.text
            assert r.headers["ratelimit-policy"] == '"token";q=2;w=60, "account";q=3;w=60'
        r = c.post(CLS, json={"inputs": "hi"}, headers=auth(first))
        assert r.status_code == 429 and "per token" in r.json()["error"], r.text
        assert int(r.headers["retry-after"]) >= 1 and '"token";r=0' in r.headers["ratelimit"]
        assert "inference-id" not in r.headers, "a refused request is not run"
        assert c.post(CLS, json={"inputs": "hi"}, headers=auth(second)).status_code == 200
        r = c.post(CLS, json={"inputs": "hi"}, headers=auth(second))  # the account's fourth
        assert r.status_code == 429 and "per account" in r.json()["error"]


def test_a_concurrent_slot_comes_back_when_each_answer_ends_streams_and_refusals_included(make_core):
    limits = {"pro": {"per_token": {"concurrent_requests": 1}, "per_account": {"concurrent_requests": 1}}}
    core = make_core(billing={"mode": "tokens", "rate_limits": limits})
    token = user_token(core, "ann")
    guard = core.rate_limiter
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with client_of(core) as c:
        for _ in range(3):  # one at a time: each gets the slot the one before gave back
            assert c.post(CLS, json={"inputs": "hi"}, headers=auth(token)).status_code == 200
        r = c.post(f"{LLM}/v1/chat/completions", json=chat, headers=auth(token))
        assert r.status_code == 200 and "[DONE]" in r.text
        # refused by the route: the slot comes back too
        r = c.post(CLS, json={"inputs": 42}, headers=auth(token))
        assert r.status_code == 400, r.text
        assert c.post(CLS, json={"inputs": "hi"}, headers=auth(token)).status_code == 200
    assert guard.in_flight("account:ann") == 0


# 8. /metrics and /docs


@pytest.mark.parametrize(
    ("settings", "no_token", "admin", "user"),
    [
        ({}, 200, 200, 200),  # the laptop: open mode on 127.0.0.1
        ({"host": "0.0.0.0"}, 401, 200, 403),  # open mode on every interface: admin only
        ({"billing": {"mode": "tokens"}}, 401, 200, 403),
        ({"security": {"ops_endpoints": "off"}}, 404, 404, 404),
        ({"billing": {"mode": "tokens"}, "security": {"ops_endpoints": "public"}}, 200, 200, 200),
    ],
)
def test_metrics_and_docs_follow_the_setting(make_core, settings, no_token, admin, user):
    settings = {**settings, "billing": {"admin_token": ADMIN, **settings.get("billing", {})}}
    core = make_core(**settings)
    token = user_token(core, "ann")
    with client_of(core) as c:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == no_token, path
            assert c.get(path, headers=auth(ADMIN)).status_code == admin, path
            assert c.get(path, headers=auth(token)).status_code == user, path


# 9. The audit log


def test_admin_actions_are_audited_and_listed_by_hfi_accounts_audit(make_core, monkeypatch):
    from billing.cli import register

    core = make_core(billing={"mode": "tokens", "admin_token": ADMIN})
    ann = user_token(core, "ann")
    with client_of(core) as c:
        assert c.post("/admin/users", json={"name": "zed"}, headers=auth(ADMIN)).status_code == 201
        assert c.get("/admin/accounts", headers=auth(ADMIN)).status_code == 200  # a read: not audited
        assert c.post("/admin/users", json={"name": "eve"}, headers=auth(ann)).status_code == 403
    app = typer.Typer()
    register(app)
    url = core.billing.database_url
    runner = CliRunner()
    made = runner.invoke(app, ["accounts", "create-user", "cli-made", "--database-url", url])
    assert made.exit_code == 0, made.output
    listed = runner.invoke(app, ["accounts", "audit", "--json", "--database-url", url])
    assert listed.exit_code == 0, listed.output
    entries = json.loads(listed.output)
    got = [(e["actor"], e["action"], e["status"]) for e in entries]
    assert got[0][1] == "hfi accounts create-user", entries
    assert got[0][0].startswith("cli:") and "cli-made" in entries[0]["target"]
    assert ("(admin)", "POST /admin/users", 201) in got
    assert ("ann", "POST /admin/users", 403) in got
    assert not any(action.startswith("GET") for _, action, _ in got)
    text = runner.invoke(app, ["accounts", "audit", "--actor", "ann", "--database-url", url])
    assert "POST /admin/users" in text.output and "(admin)" not in text.output


# 7. The chat prompt's characters, capped at the ingress before the replica


@pytest.mark.parametrize(
    "content",
    [
        "x" * 100_001,
        [{"type": "text", "text": "x" * 60_000}, {"type": "text", "text": "y" * 60_000}],
    ],
)
def test_a_chat_prompt_past_the_character_limit_never_reaches_the_replica(make_core, content):
    core = make_core()
    with client_of(core) as c:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
        r = c.post(f"{LLM}/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert "messages" in r.json()["error"] and "limits.max_input_chars" in r.json()["error"]
        r = c.post(
            "/v1/chat/completions", json={**body, "model": LLM.removeprefix("/models/"), "stream": True}
        )
        assert r.status_code == 400, r.text
    assert [call for call, _ in core.backend.calls if call != "info"] == [], "nothing ran on the replica"


def test_concurrent_requests_of_a_token_not_cached_share_one_database_look_up(make_core, monkeypatch):
    """Every token_cache_ttl_s a busy token's cache entry expires, and all its requests in flight miss together:
    they wait for one `resolve_token`, not one each. An unknown token's concurrent requests share its 401 too."""
    import time

    import httpx

    core = make_core(billing={"mode": "tokens"})
    token = user_token(core, "ann")
    core.billing.accounts._tokens.clear()  # as after the entry expired
    accounts = core.billing.accounts
    calls: list[str] = []  # the look-ups that read the database (a cache miss)
    real = accounts.resolve_token

    def counted(tok: str, **kwargs: Any) -> Any:
        try:
            hit = accounts.cached_caller(tok)
        except Exception:  # cached as unknown: answered from the cache
            hit = True
        if hit is None or not kwargs.get("cached", True):
            calls.append(tok)
            time.sleep(0.05)  # a database read: long enough for the others to arrive
        return real(tok, **kwargs)

    monkeypatch.setattr(accounts, "resolve_token", counted)
    app = create_app(core)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            ok = [c.post(CLS, json={"inputs": "I love it"}, headers=auth(token)) for _ in range(12)]
            bad = [c.post(CLS, json={"inputs": "x"}, headers=auth("hfi_" + "x" * 40)) for _ in range(6)]
            return [r.status_code for r in await asyncio.gather(*ok, *bad)]

    statuses = asyncio.run(main())
    assert statuses == [200] * 12 + [401] * 6
    assert sorted(calls) == sorted([token, "hfi_" + "x" * 40]), calls
