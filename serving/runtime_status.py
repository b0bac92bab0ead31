"""What the running service is doing now, for `hfi status` (GET /admin/status).

Each model is a Serve application of its own, so the figures come from several places:

- replicas (running, starting, target): Serve's controller (`serve.status()`, and the target from its details);
- requests in flight: Serve's count of ongoing requests on each of the model's replicas, plus the requests the
  router holds in its own batcher for the model;
- queue: those of them not computing yet (waiting in a replica's batcher, in a continuous batching engine's queue,
  or for the model's one forward pass at a time), plus the router's batcher;
- requests/s and p50 over the last minute: every serving process (the router and each replica) keeps a window of
  its finished requests (metering/recent.py); the windows are merged here;
- spool backlog and drain lag: every serving process spools its own charges (MeteringService.backlog);
- spend today and this month: the ledger (all accounts; charges still in a spool come in when drained).

Each replica answers through Ray's `actor.__ray_call__(process_snapshot)`, in its own process. Outside Ray Serve
(the in-process server of the tests) the one process reports itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import weakref
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from metering import metrics
from metering.errors import LedgerUnavailable
from metering.recent import median

if TYPE_CHECKING:
    from serving.ingress import IngressCore

log = logging.getLogger("serving.runtime_status")

REPLICA_PREFIX = "SERVE_REPLICA::"
SNAPSHOT_TIMEOUT_S = 5.0
STARTING_STATES = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")

_cores: weakref.WeakSet[IngressCore] = weakref.WeakSet()


def register(core: IngressCore) -> None:
    """Make `core` part of this process's snapshot (called where a serving process builds its HTTP app)."""
    _cores.add(core)


def _queued(core: IngressCore, ongoing: int | None) -> dict[str, int]:
    """Requests of each model that wait in this process before their compute: in a batcher, in a continuous
    batching engine's queue (its running sequences are computing), or for the model's one forward pass at a
    time (Serve's ongoing requests on a model's replica, less the one that computes)."""
    backend = core.backend
    batchers = getattr(backend, "batchers", {})
    queued: dict[str, int] = {}
    for model_id, batcher in batchers.items():
        queued[model_id] = queued.get(model_id, 0) + batcher.queued
    executors = getattr(backend, "executors", {})
    for model_id, executor in executors.items():
        if model_id in batchers:
            continue
        occupancy = executor.occupancy()
        if occupancy is not None:  # the engine knows its queue, with or without Serve's count
            queued[model_id] = queued.get(model_id, 0) + occupancy[1]
        elif ongoing is not None and len(executors) == 1:  # a model's replica: its one model
            queued[model_id] = queued.get(model_id, 0) + max(0, ongoing - (1 if executor.busy else 0))
    return queued


def process_snapshot(actor: Any = None, cores: list[IngressCore] | None = None) -> dict[str, Any]:
    """This serving process now: Serve's tags, ongoing requests, per-model window and queue, spool backlog.

    Runs in a replica through Ray's `actor.__ray_call__` (its one argument is the replica actor)."""
    from serving.metrics_export import replica_tags

    tags = replica_tags() if actor is not None else {}
    get_ongoing = getattr(actor, "get_num_ongoing_requests", None)
    ongoing = int(get_ongoing()) if callable(get_ongoing) else None
    window = {
        w.model_id: {"requests": w.requests, "errors": w.errors, "latencies_s": w.latencies_s}
        for w in metrics.RECENT.snapshot()
    }
    queued: dict[str, int] = {}
    spool = {
        "pending_charges": 0,
        "pending_bytes": 0,
        "drain_lag_s": 0.0,
        "node_drainer": 0,
        "unspooled_charges": 0,
    }
    for core in cores if cores is not None else list(_cores):
        for model_id, n in _queued(core, ongoing).items():
            queued[model_id] = queued.get(model_id, 0) + n
        try:
            backlog = core.metering.backlog()
        except Exception:  # a closing process: its spool is replayed by the next one
            continue
        spool["pending_charges"] += backlog["pending_charges"]
        spool["pending_bytes"] += backlog["pending_bytes"]
        spool["drain_lag_s"] = max(spool["drain_lag_s"], backlog["drain_lag_s"])
        spool["node_drainer"] += int(bool(backlog.get("node_drainer")))
        spool["unspooled_charges"] += backlog["unspooled_charges"]
    return {"tags": tags, "ongoing": ongoing, "window": window, "queued": queued, "spool": spool}


def _in_serve() -> bool:
    from serving.metrics_export import replica_tags

    try:
        return bool(replica_tags())
    except Exception:
        return False


def replica_snapshots(timeout_s: float = SNAPSHOT_TIMEOUT_S) -> list[dict[str, Any]]:
    """`process_snapshot` of every live Serve replica (those that do not answer within `timeout_s` are left out)."""
    import ray

    refs = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and actor["name"].startswith(REPLICA_PREFIX):
            try:
                handle = ray.get_actor(actor["name"], namespace="serve")
            except ValueError:  # gone meanwhile
                continue
            refs.append(handle.__ray_call__.remote(process_snapshot))
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    snaps = []
    for ref in ready:
        try:
            snaps.append(ray.get(ref))
        except Exception as err:  # a replica stopping or failing now: counted by Serve's states, not here
            log.debug("a replica did not give its snapshot: %s", err)
    return snaps


def serve_replicas() -> dict[str, dict[str, int]]:
    """Serve's replicas per application: running, starting, target."""
    from ray import serve

    found: dict[str, dict[str, int]] = {}
    for app, overview in serve.status().applications.items():
        running = starting = 0
        for deployment in overview.deployments.values():
            for state, n in deployment.replica_states.items():
                name = getattr(state, "value", str(state))
                running += n if name == "RUNNING" else 0
                starting += n if name in STARTING_STATES else 0
        found[app] = {"running": running, "starting": starting, "target": running + starting}
    try:  # the target of an autoscaling deployment (the overview above has no target)
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        for app, info in (details.get("applications") or {}).items():
            if app in found:
                found[app]["target"] = sum(
                    int(d.get("target_num_replicas", 0)) for d in (info.get("deployments") or {}).values()
                )
    except Exception as err:
        log.debug("Serve's details are not available (%s): target = running + starting", err)
    return found


def _spend(core: IngressCore, now: dt.datetime) -> dict[str, Any]:
    from core.money import usd_str

    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    try:
        day_total = core.metering.usage_report(today, None).totals
        month_total = core.metering.usage_report(month, None).totals
    except LedgerUnavailable as err:
        return {"error": err.message}
    return {
        "today_nanousd": day_total.cost_nanousd,
        "today_usd": usd_str(day_total.cost_nanousd),
        "today_requests": day_total.requests,
        "month_nanousd": month_total.cost_nanousd,
        "month_usd": usd_str(month_total.cost_nanousd),
        "month_requests": month_total.requests,
        "month": month.strftime("%Y-%m"),
    }


def _price(profile: Any, now: dt.datetime) -> dict[str, str | None]:
    """The price in force now, as the catalog states it (per hour, or per second and its exact hourly rate)."""
    point = profile.price_at(now)
    if point.usd_per_hour is not None:
        return {"usd_per_hour": format(Decimal(point.usd_per_hour).normalize(), "f"), "usd_per_second": None}
    per_second = Decimal(point.usd_per_second)
    return {
        "usd_per_hour": format((per_second * 3600).normalize(), "f"),
        "usd_per_second": format(per_second.normalize(), "f"),
    }


def _merge(snaps: list[dict[str, Any]], model_id: str, app: str | None, window_s: float) -> dict[str, Any]:
    """One model's figures over every process's snapshot (`app`: the model's Serve application)."""
    in_flight: int | None = None
    queue = requests = errors = 0
    latencies: list[float] = []
    for snap in snaps:
        own = app is not None and snap["tags"].get("application") == app
        if own and snap["ongoing"] is not None:
            in_flight = (in_flight or 0) + snap["ongoing"]
        waiting = snap["queued"].get(model_id, 0)
        queue += waiting
        if not own and waiting:  # the router's own batcher: held there, not yet on a replica
            in_flight = (in_flight or 0) + waiting
        seen = snap["window"].get(model_id)
        if seen:
            requests += seen["requests"]
            errors += seen["errors"]
            latencies += seen["latencies_s"]
    p50 = median(latencies)
    return {
        "in_flight": in_flight,
        "queue": queue,
        "requests_last_minute": requests,
        "errors_last_minute": errors,
        "requests_per_s": round(requests / window_s, 3),
        "p50_ms": None if p50 is None else round(p50 * 1000, 1),
    }


def collect_status(core: IngressCore) -> dict[str, Any]:
    """The status document of GET /admin/status (see the module docstring)."""
    from serving.app import app_name

    settings = core.settings
    now = dt.datetime.now(dt.timezone.utc)
    window_s = metrics.RECENT.window_s
    if _in_serve():
        source = "ray-serve"
        replicas = serve_replicas()
        snaps = replica_snapshots()
    else:
        source = "in-process"
        replicas = {}
        snaps = [process_snapshot(None, [core])]
    models = []
    for spec in core.catalog.models:
        app = app_name(spec, settings) if source == "ray-serve" else None
        counts = replicas.get(app or "", {"running": 1, "starting": 0, "target": 1} if app is None else {})
        profile = core.profiles.get(spec.hardware_profile)
        models.append(
            {
                "model_id": spec.id,
                "task": spec.task,
                "application": app,
                "replicas": {k: counts.get(k, 0) for k in ("running", "starting", "target")},
                **_merge(snaps, spec.id, app, window_s),
                "hardware_profile": spec.hardware_profile,
                "price": _price(profile, now),
            }
        )
    spool = {
        "pending_charges": 0,
        "pending_bytes": 0,
        "drain_lag_s": 0.0,
        "node_drainer_processes": 0,
        "unspooled_charges": 0,  # held in memory: a spool that cannot write (the processes refuse requests)
    }
    for snap in snaps:
        spool["pending_charges"] += snap["spool"]["pending_charges"]
        spool["pending_bytes"] += snap["spool"]["pending_bytes"]
        spool["drain_lag_s"] = max(spool["drain_lag_s"], snap["spool"]["drain_lag_s"])
        spool["node_drainer_processes"] += int(snap["spool"].get("node_drainer", 0) > 0)
        spool["unspooled_charges"] += snap["spool"]["unspooled_charges"]
    router = replicas.get(app_name(None, settings)) if source == "ray-serve" else None
    billing = settings.billing
    return {
        "time": now.isoformat(),
        "source": source,
        "window_s": window_s,
        "processes": len(snaps),
        "router": router,
        "models": models,
        "spend": _spend(core, now),
        "ledger": {**spool, "metering_enabled": settings.metering.enabled},
        "billing": {"mode": billing.mode, "accept_hf_tokens": billing.accept_hf_tokens},
    }
