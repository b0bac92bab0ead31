"""Security rules as plain Python: rate limits, Hub whoami single-flight, secrets never from a settings file, route
families and browser origins."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from starlette.datastructures import Headers

from billing.errors import HubUnavailable, Unauthorized
from billing.hub import WhoamiCache
from billing.ratelimit import Check, RateLimited, RateLimiter, RateLimitPolicy
from core.settings import SettingsError
from serving.config import Settings
from serving.security import cross_origin, route_kind, same_origin

# Rate limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refuse_with_retry_after_and_ietf_fields():
    clock = Clock()
    limiter = RateLimiter(clock)
    checks = [Check("token", "t1", RateLimitPolicy(requests_per_minute=2))]
    first = limiter.acquire(checks)
    assert first.headers["ratelimit-policy"] == '"token";q=2;w=60'
    assert first.headers["ratelimit"].startswith('"token";r=1;')
    limiter.acquire(checks)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(checks)
    err = refused.value
    assert err.status_code == 429 and "2 requests per minute per token" in err.message
    assert err.retry_after_s == 30 and err.headers["retry-after"] == "30"  # one request back every 30 s
    assert err.headers["ratelimit"].startswith('"token";r=0;')
    clock.now += 30
    limiter.acquire(checks)  # refilled


def test_concurrent_requests_come_back_when_released_and_a_refusal_counts_nowhere():
    limiter = RateLimiter(Clock())
    account = Check("account", "acct", RateLimitPolicy(concurrent_requests=1))
    token = Check("token", "tok", RateLimitPolicy(requests_per_minute=100, concurrent_requests=5))
    held = limiter.acquire([token, account])
    with pytest.raises(RateLimited, match="1 requests at once per account"):
        limiter.acquire([token, account])
    assert limiter.in_flight("tok") == 1, "the refused request took no slot"
    held.release()
    held.release()  # idempotent
    assert limiter.in_flight("acct") == 0
    limiter.acquire([token, account]).release()


def test_no_policy_no_limit():
    limiter = RateLimiter(Clock())
    for _ in range(1000):
        limiter.acquire([Check("token", "t", RateLimitPolicy())])


# Hub whoami: single-flight, bounded, negative cache


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_whoami_is_single_flight_per_token():
    release, calls = threading.Event(), []

    def hub(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["authorization"])
        release.wait(20)
        return httpx.Response(200, json={"name": "ann", "orgs": []})

    cache = WhoamiCache("http://hub.test", transport=httpx.MockTransport(hub))
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(cache.identify, "hf_same")
        _wait_until(lambda: calls, "the first look-up reached the Hub")
        others = [pool.submit(cache.identify, "hf_same") for _ in range(7)]
        _wait_until(lambda: cache.joined == 7, "the other callers joined the look-up in flight")
        release.set()
        names = {f.result().name for f in [first, *others]}
    assert names == {"ann"} and cache.hub_calls == 1 and len(calls) == 1
    cache.close()


def test_whoami_refuses_new_tokens_past_its_pending_bound_and_caches_unknown_ones():
    release = threading.Event()
    asked: list[str] = []

    def hub(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["authorization"])
        release.wait(20)
        return httpx.Response(401)

    cache = WhoamiCache(
        "http://hub.test", transport=httpx.MockTransport(hub), max_concurrency=1, max_pending=2
    )
    a, b = cache.lookup("hf_a"), cache.lookup("hf_b")
    with pytest.raises(HubUnavailable, match="Too many"):
        cache.lookup("hf_c")  # a third random token is refused at once: no thread, no Hub call
    release.set()
    assert a.result(20) is None and b.result(20) is None
    with pytest.raises(Unauthorized):
        cache.identify("hf_a")  # unknown, from the negative cache
    assert cache.hub_calls == 2 and len(asked) == 2
    cache.close()


# Secrets never from a settings file


def _settings_file(tmp_path, data) -> dict[str, str]:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return {"HFI_CONFIG": str(path)}


@pytest.mark.parametrize(
    ("data", "variable"),
    [
        ({"billing": {"admin_token": "s3cret"}}, "HFI_ADMIN_TOKEN"),
        ({"metering": {"provider_secret": "s3cret"}}, "HFI_PROVIDER_SECRET"),
        ({"metering": {"collector_token": "s3cret"}}, "HFI_COLLECTOR_TOKEN"),
        ({"metering": {"database_url": "postgresql+psycopg://hfi:pw@db:5432/hfi"}}, "HFI_DATABASE_URL"),
        ({"hf_token": "hf_x"}, "HF_TOKEN"),
    ],
)
def test_a_secret_in_the_settings_file_is_refused_naming_its_variable(tmp_path, data, variable):
    with pytest.raises(SettingsError) as refused:
        Settings.load(env=_settings_file(tmp_path, data))
    message = str(refused.value)
    assert variable in message and f"{variable}_FILE" in message and "settings.yaml" in message


def test_a_database_url_without_a_password_stays_allowed(tmp_path):
    url = "postgresql+psycopg://hfi@db:5432/hfi"
    settings = Settings.load(env=_settings_file(tmp_path, {"metering": {"database_url": url}}))
    assert settings.metering.database_url == url


def test_secrets_come_from_mounted_files_and_never_reach_the_serve_args(tmp_path, monkeypatch):
    from serving.app import applications

    secret = tmp_path / "admin-token"
    secret.write_text("from-a-file\n")
    env = {**_settings_file(tmp_path, {"port": 8123}), "HFI_ADMIN_TOKEN_FILE": str(secret)}
    settings = Settings.load(env=env)
    assert settings.billing.admin_token == "from-a-file"
    assert "admin_token" not in settings.replica_args()["billing"]
    with pytest.raises(SettingsError, match="HFI_PROVIDER_SECRET_FILE"):
        Settings.load(env={"HFI_PROVIDER_SECRET_FILE": str(tmp_path / "missing")})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for app in applications():
        assert "from-a-file" not in repr(app.args)


# Route families and origins


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/admin/accounts", "admin"),
        ("POST", "/billing/requests", "cost_lookup"),
        ("GET", "/billing/usage", "account"),
        ("GET", "/billing", "page"),
        ("GET", "/billing/app.js", "page"),
        ("GET", "/usage", "account"),
        ("GET", "/metrics", "ops"),
        ("GET", "/openapi.json", "ops"),
        ("GET", "/docs", "ops"),
        ("POST", "/models/local/tiny-sentiment", "inference"),
        ("POST", "/v1/chat/completions", "inference"),
        ("GET", "/health", "health"),
    ],
)
def test_route_kinds(method, path, kind):
    assert route_kind(method, path) == kind


def test_origins():
    assert same_origin("http://localhost:8000", "localhost:8000")
    assert same_origin("https://hfi.example.com", "hfi.example.com")  # TLS ended in front
    assert not same_origin("http://evil.example", "localhost:8000")
    assert not same_origin("null", "localhost:8000")
    assert cross_origin(Headers({"origin": "http://evil.example", "host": "localhost:8000"}), []) == (
        "http://evil.example"
    )
    assert (
        cross_origin(Headers({"origin": "http://evil.example", "host": "x"}), ["http://evil.example"]) is None
    )
    assert (
        cross_origin(Headers({"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}), [])
        == "cross-site"
    )
    assert cross_origin(Headers({"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}), []) is None
    assert cross_origin(Headers({"host": "localhost:8000"}), []) is None  # curl, the CLI, SDKs
