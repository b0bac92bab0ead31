"""Whatever a client sends to the billing side, the answer is never a 500: the admin API, the usage API and the
billing page's data, credentials and X-HF-Bill-To on inference, and the cost look-up, in tokens mode over HTTP (the
real ingress and the tiny classifier in process), on SQLite and on the tests' PostgreSQL, which refuses more (a
NUL in a string, integers past 64 bits) than SQLite does."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from fixtures.fuzz import FUZZ, assert_answered, header_text, values
from fixtures.inprocess import tokens_mode_sentiment
from fixtures.postgres import create_database, drop_database
from hypothesis import given
from hypothesis import strategies as st

CLS = "local/tiny-sentiment"
SECRET = "provider-secret-for-the-fuzz"
# What PostgreSQL refuses or a name must not hold: drawn often, not left to chance.
NASTY = ["a\x00b", "abc\n", "é" * 120, "x" * 300, " ", "\t", "una\x00"]


ADMIN_CALLS = [
    ("POST", "/admin/users", {"name": "text", "tier": "text", "admin": "bool"}),
    ("PUT", "/admin/users/{name}/tier", {"tier": "text"}),
    ("POST", "/admin/users/{name}/tokens", {"label": "text"}),
    ("DELETE", "/admin/tokens/{name}", None),
    ("POST", "/admin/orgs", {"name": "text", "seats": "int", "enterprise": "bool", "plan": "text",
                             "spending_limit_nanousd": "int"}),
    ("PUT", "/admin/orgs/{name}/plan", {"plan": "text", "seats": "int"}),
    ("PUT", "/admin/orgs/{name}/members/{user}", {"admin": "bool"}),
    ("DELETE", "/admin/orgs/{name}/members/{user}", None),
    ("PUT", "/admin/accounts/{name}/spending-limit", {"spending_limit_nanousd": "int"}),
    ("PUT", "/admin/orgs/{name}/disabled-models/{user}", None),
    ("DELETE", "/admin/orgs/{name}/disabled-models/{user}", None),
]  # fmt: skip
KINDS = {
    "text": st.sampled_from(["una", "acme", "pro", "free", "team", "enterprise", "", *NASTY])
    | st.text(max_size=20),
    "int": st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]) | st.integers(),
    "bool": st.booleans(),
}
names = st.sampled_from(["una", "acme", "root", "nobody", *NASTY]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/?#%"), min_size=1, max_size=12
)  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tokens(request, model_store, tmp_path_factory):
    """The tiny classifier in tokens mode over HTTP: (base URL, the operator's token, a user's token)."""
    url = None
    if request.param == "postgresql":
        url = create_database(request.getfixturevalue("postgres_server").url)
    work = tmp_path_factory.mktemp("fuzz-tokens")
    with tokens_mode_sentiment(model_store, work, url, SECRET) as (base, core):
        accounts = core.billing.accounts
        accounts.create_user("root", "pro", is_admin=True)
        accounts.create_user("una", "pro")
        accounts.create_org("acme", seats=2)
        accounts.add_member("acme", "una", admin=True)
        yield base, accounts.issue_token("root").token, accounts.issue_token("una").token
    if url is not None:
        drop_database(url)


@FUZZ
@given(
    call=st.sampled_from(ADMIN_CALLS),
    name=names,
    user=names,
    data=st.data(),
    who=st.sampled_from(["root", "una", "none", "junk"]),
)
def test_the_admin_api_answers_any_call_without_a_500(tokens, call, name, user, data, who):
    base, root, una = tokens
    method, template, fields = call
    path = template.format(name=quote(name, safe=""), user=quote(user, safe=""))
    body = None
    if fields is not None:
        body = data.draw(
            st.fixed_dictionaries({}, optional={f: KINDS[k] | values for f, k in fields.items()}) | values,
            label="body",
        )
    auth = {"root": f"Bearer {root}", "una": f"Bearer {una}", "none": None, "junk": data.draw(header_text)}[
        who
    ]
    headers = {"authorization": auth} if auth is not None else {}
    r = httpx.request(method, base + path, json=body, headers=headers, timeout=60)
    assert_answered(r, f"{method} {path} {body!r} as {who}", errors_are_json=False)


@FUZZ
@given(
    path=st.sampled_from(["/billing/usage", "/billing/account", "/billing/chart.svg", "/billing/me", "/admin/status",
                          "/admin/accounts", "/usage"]),
    query=st.dictionaries(st.sampled_from(["account", "month", "format", "limit", "cursor", "name", "since"]),
                          st.sampled_from(["2026-12", "2026-13", "0000-01", "9999-12", "una", "acme", "csv", "-1",
                                           "10001", "abc", *NASTY]) | st.text(max_size=20), max_size=3),
    who=st.sampled_from(["root", "una", "none"]),
)  # fmt: skip
def test_the_billing_pages_answer_any_query_without_a_500(tokens, path, query, who):
    base, root, una = tokens
    headers = {"authorization": f"Bearer {root if who == 'root' else una}"} if who != "none" else {}
    r = httpx.get(base + path, params=query, headers=headers, timeout=60)
    assert_answered(r, f"GET {path} {query!r} as {who}", errors_are_json=False)


@FUZZ
@given(
    auth=header_text | st.just("Bearer") | header_text.map(lambda t: f"Bearer {t}".strip()),
    bill_to=st.none() | st.sampled_from(["acme", "una", "nobody"]) | header_text,
    real_token=st.booleans(),
)
def test_inference_with_any_credentials_gets_a_clear_answer(tokens, auth, bill_to, real_token):
    base, _, una = tokens
    headers = {"authorization": f"Bearer {una}" if real_token else auth}
    if bill_to is not None:
        headers["x-hf-bill-to"] = bill_to
    r = httpx.post(f"{base}/models/{CLS}", json={"inputs": "fine"}, headers=headers, timeout=60)
    assert_answered(r, f"POST /models/{CLS} with {headers!r}", errors_are_json=False)


@FUZZ
@given(
    body=st.fixed_dictionaries({"requestIds": st.lists(st.text(max_size=40) | values, max_size=5) | values})
    | values,
    secret=st.sampled_from([SECRET, "wrong"]),
)
def test_the_cost_look_up_answers_any_body_without_a_500(tokens, body, secret):
    base = tokens[0]
    r = httpx.post(
        f"{base}/billing/requests", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=60
    )
    assert_answered(r, f"POST /billing/requests {body!r}", errors_are_json=False)
    if secret == SECRET and r.status_code == 200:
        assert r.json() == {"requests": []}  # nothing generated here is a real request id


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("GET", "/billing/usage?account=a%00b", None, "the URL has a NUL character"),
        ("GET", "/billing/account?name=a%00b", None, "the URL has a NUL character"),
        ("GET", "/billing/chart.svg?account=a%00b", None, "the URL has a NUL character"),
        ("PUT", "/admin/users/a%00b/tier", {"tier": "pro"}, "the URL has a NUL character"),
        ("DELETE", "/admin/tokens/a%00b", None, "the URL has a NUL character"),
        ("PUT", "/admin/orgs/acme/disabled-models/a%00b", None, "the URL has a NUL character"),
        ("PUT", "/admin/orgs/acme/disabled-models/a%20b", None, "model_id: "),
        ("POST", "/admin/users/una/tokens", {"label": "a\x00b"}, "label: "),
        ("POST", "/admin/users/una/tokens", {"label": "x" * 101}, "label: "),
        ("POST", "/admin/users", {"name": "abc\n"}, "name: "),
    ],
)
def test_what_no_name_or_field_may_hold_is_a_400_on_either_database(tokens, method, path, body, error):
    """Each of these was a 500 on PostgreSQL (a NUL in a query), or stored as given on SQLite."""
    base, root, _ = tokens
    r = httpx.request(method, base + path, json=body, headers={"authorization": f"Bearer {root}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(error)
