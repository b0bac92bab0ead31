"""What admission costs: requests/s of one in-process IngressCore in `billing.mode: open` and in `tokens`.

    .venv/bin/python benchmarks/admission.py [--model-store DIR] [--rounds 6] [--duration 2] [--clients 8]

One process, no Ray, no HTTP server: each arm is an `IngressCore` over the same `InProcessBackend` (one
`local/tiny-sentiment`, a random-weight classifier that costs about a millisecond), driven by `--clients`
concurrent callers of `IngressCore.handle` in closed loop (ASGI requests built in memory, so the figures are the
ingress's own: parsing, admission, the model call, metering's fsync'd spool, settlement). Every arm has its own
SQLite ledger and spool; the metering drain and billing's background writer run as in production.

Arms:

- `open`: no token, no credits: no database work on the request path.
- `tokens capped`: a token issued here, billed to a PRO account with a spending limit (so admission must hold a
  budget: the path a free account or a limited one takes).
- `tokens uncapped`: a PRO account without a spending limit (pay-as-you-go without a cap: nothing to hold).
- `... inline`: the same two, through `InlineBillingCore`, an IngressCore that admits on the event loop with
  `BillingService.admit_nowait` when it can (cached token and policy, estimate within the lease; else the worker
  thread as before) and settles and releases on the loop (both only queue in memory now): what the ingress
  gains without its two thread hops per request. The ingress itself is unchanged; this subclass is the
  measurement of a proposed change to serving/ingress.py.

Each round runs every arm once, after `--warmup` unmeasured seconds, the order rotated per round so a drift in
the machine's load falls on every arm; the ratios are of the mean throughputs over the run, per round, and the
median of the rounds (on a shared machine single rounds swing by tens of percent: read the CPU per request too). At
the end it checks that every arm's ledger holds one charge per successful response and that billing's settled
total of each tokens arm equals its ledger's (nothing lost behind the response). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "local/tiny-sentiment"
BODY = json.dumps({"inputs": "I really enjoyed this movie, it was great"}).encode()
ARMS = ("open", "tokens capped", "tokens uncapped", "tokens capped inline", "tokens uncapped inline")


def inline_billing_core() -> type:
    """IngressCore with billing's in-memory paths called on the event loop (see the module's docstring)."""
    from billing.service import estimate_nanousd
    from serving.ingress import IngressCore
    from serving.routes.accounts import bearer_token

    class InlineBillingCore(IngressCore):
        async def admit(self, request: Any, ctx: Any, spec: Any) -> Any:
            if self.settings.billing.mode == "tokens":
                price = self.profiles.get(spec.hardware_profile).price_at(ctx.started_at).usd_per_second_exact
                admission = self.billing.admit_nowait(
                    bearer_token(request),
                    request.headers.get("x-hf-bill-to"),
                    spec.id,
                    estimate_nanousd(price, self.settings.billing.estimate_compute_s),
                    ctx.started_at,
                    request_id=ctx.inference_id,
                )
                if admission is not None:
                    ctx.user, ctx.billed_account = admission.user, admission.billed_account
                    return admission
            return await super().admit(request, ctx, spec)

        async def settle(self, job: Any, charge: Any) -> None:
            if job.admission.reservation_id is not None:
                self.billing.settle(
                    job.admission,
                    charge.cost_nanousd,
                    request_id=job.ctx.inference_id,
                    hardware_profile=job.spec.hardware_profile,
                )

        async def release(self, admission: Any) -> None:
            if admission.reservation_id is not None:
                self.billing.release(admission)

    return InlineBillingCore


def make_core(work: Path, model_store: Path, arm: str, backend: Any) -> Any:
    """An IngressCore for `arm` with its own ledger and spool, over the shared in-process backend."""
    from serving.config import Settings
    from serving.ingress import IngressCore

    spec = {
        "id": MODEL,
        "task": "text-classification",
        "source": {"path": "tiny-sentiment", "prepare": "tiny-sentiment"},
        "hardware_profile": "cpu-basic",
        "dtype": "float32",
    }
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": [spec],
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
            "billing": {"mode": arm.split()[0], "estimate_compute_s": 1},
        },
        env={},
    )
    core_class = inline_billing_core() if arm.endswith("inline") else IngressCore
    return core_class(settings, backend)


def make_backend(model_store: Path) -> Any:
    """The tiny classifier loaded once in this process (prepared on first use, no download)."""
    from serving.config import Settings
    from serving.inprocess import InProcessBackend

    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": [
                {
                    "id": MODEL,
                    "task": "text-classification",
                    "source": {"path": "tiny-sentiment", "prepare": "tiny-sentiment"},
                    "hardware_profile": "cpu-basic",
                    "dtype": "float32",
                }
            ],
        },
        env={},
    )
    catalog, _ = settings.validated()
    return InProcessBackend(catalog, settings.load_options(), torch_threads=1)


def request_of(token: str | None) -> Any:
    """A POST /models/local/tiny-sentiment as Starlette sees it, body in memory."""
    from starlette.requests import Request

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": f"/models/{MODEL}",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    return Request(scope, receive)


async def run_arm(core: Any, token: str | None, clients: int, warmup_s: float, duration_s: float) -> dict:
    """Closed-loop callers for warmup + duration; what finished in the measured window (and in all)."""
    done = {"ok": 0, "other": 0, "answered_ok": 0}
    measuring = False
    stop_at = time.perf_counter() + warmup_s + duration_s

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            response = await core.handle(request_of(token), MODEL)
            done["answered_ok"] += response.status_code == 200
            if measuring:
                done["ok" if response.status_code == 200 else "other"] += 1

    tasks = [asyncio.create_task(caller()) for _ in range(clients)]
    await asyncio.sleep(warmup_s)
    measuring, t0, cpu0 = True, time.perf_counter(), time.process_time()
    await asyncio.gather(*tasks)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    n = done["ok"]
    return {
        "ok": n,
        "answered_ok": done["answered_ok"],  # warm-up included: each one has a charge in the ledger
        "errors": done["other"],
        "req_per_s": n / wall_s,
        "cpu_ms_per_request": 1000 * cpu_s / n if n else None,
    }


def setup_tokens(core: Any, capped: bool) -> str:
    """A PRO user (with a $10,000 monthly limit when `capped`) and a token of theirs."""
    accounts = core.billing.accounts
    accounts.create_user("bench", "pro")
    if capped:
        accounts.set_spending_limit("bench", 10_000 * 10**9)
    return accounts.issue_token("bench").token


def check_books(core: Any, ok: int) -> dict[str, Any]:
    """The ledger's charges (after the drain) and billing's settled total, for the end-of-run check."""
    from metering.ledger import Ledger

    core.metering.close()  # drains the spool into the ledger
    ledger = Ledger(core.billing.database_url)
    try:
        charges = list(ledger.charges(None, None))
    finally:
        ledger.close()
    out: dict[str, Any] = {"responses_ok": ok, "ledger_charges": len(charges)}
    billing = core.billing
    if core.settings.billing.mode == "tokens":
        billing.spend.return_leases()  # what close() does: leases back, every queued settlement written
        rec = {m: billing.reconcile(m) for m in {c.usage.started_at_utc.strftime("%Y-%m") for c in charges}}
        out["billing_equals_ledger"] = all(r.ok for r in rec.values())
        out["billing_settled_nanousd"] = sum(r.billing_total_nanousd for r in rec.values())
        out["ledger_total_nanousd"] = sum(c.cost_nanousd for c in charges)
    billing.close()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    backend = make_backend(args.model_store)
    work = Path(tempfile.mkdtemp(prefix="hfi-admission-bench-"))
    try:
        return await run_arms(args, backend, work)
    finally:  # the arms' ledgers and spools
        shutil.rmtree(work, ignore_errors=True)


async def run_arms(args: argparse.Namespace, backend: Any, work: Path) -> dict[str, Any]:
    cores = {arm: make_core(work / arm.replace(" ", "-"), args.model_store, arm, backend) for arm in ARMS}
    tokens = {
        arm: None if arm == "open" else setup_tokens(cores[arm], capped="uncapped" not in arm) for arm in ARMS
    }
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
        for arm in order:
            res = await run_arm(cores[arm], tokens[arm], args.clients, args.warmup, args.duration)
            results[arm].append(res)
            print(
                f"round {r + 1} {arm:23s} {res['req_per_s']:8.1f} req/s  errors {res['errors']}", flush=True
            )
    await asyncio.sleep(0.2)  # background settlements of the last requests
    summary: dict[str, Any] = {"arms": {}, "ratios": {}, "books": {}}
    for arm in ARMS:
        rates = [x["req_per_s"] for x in results[arm]]
        cpus = [x["cpu_ms_per_request"] for x in results[arm] if x["cpu_ms_per_request"]]
        summary["arms"][arm] = {
            "req_per_s_mean": statistics.fmean(rates),
            "req_per_s_rounds": rates,
            "cpu_ms_per_request_mean": statistics.fmean(cpus),
            "errors": sum(x["errors"] for x in results[arm]),
        }
    base = summary["arms"]["open"]
    for arm in ARMS[1:]:
        per_round = [
            t["req_per_s"] / o["req_per_s"] for t, o in zip(results[arm], results["open"], strict=True)
        ]
        summary["ratios"][f"{arm} / open"] = {
            "over_run": summary["arms"][arm]["req_per_s_mean"] / base["req_per_s_mean"],
            "median_of_rounds": statistics.median(per_round),
            "per_round": per_round,
        }
    for arm in ARMS:
        ok = sum(x["answered_ok"] for x in results[arm])
        summary["books"][arm] = check_books(cores[arm], ok)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_store = os.environ.get(
        "HFI_TEST_MODEL_STORE", str(Path.home() / ".cache" / "hfi" / "test-models")
    )
    p.add_argument("--model-store", type=Path, default=Path(default_store))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per arm and round")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each arm")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = p.parse_args()
    summary = asyncio.run(main_async(args))
    print()
    for arm, a in summary["arms"].items():
        print(
            f"{arm:23s} {a['req_per_s_mean']:8.1f} req/s  {a['cpu_ms_per_request_mean']:.3f} ms CPU/request"
        )
    for name, r in summary["ratios"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["per_round"])
        print(f"{name:31s} {r['over_run']:.3f}, median {r['median_of_rounds']:.3f}  (per round: {rounds})")
    print(json.dumps(summary["books"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
