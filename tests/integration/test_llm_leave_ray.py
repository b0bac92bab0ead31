"""On Ray Serve (the session's service, HAProxy in front where the machine has it): a TGI stream of the LLM left
mid-way on the model's own route is charged exactly the compute of every step the replica's batching engine ran
for it, the steps after the last chunk the client read included. The engine's own account is read in the
replica's process (Ray's `__ray_call__`, as `hfi status` does)."""

from __future__ import annotations

import time
import uuid

import httpx
import sqlalchemy as sa

from metering.ledger import charges_table, row_to_charge
from metering.records import STATUS_CLIENT_DISCONNECTED

LLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WAIT_S = 60.0


def _charge(database_url: str, tag: str):
    engine = sa.create_engine(database_url)
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            try:
                with engine.connect() as conn:
                    rows = conn.execute(
                        sa.select(charges_table).where(charges_table.c.client_request_id == tag)
                    )
                    found = [row_to_charge(r) for r in rows]
            except sa.exc.OperationalError:  # the ledger's table comes with the first charge
                found = []
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    finally:
        engine.dispose()


def _engine_account(request_id: str) -> tuple[int, int]:
    """(the sum of the request's shares of the engine's steps, how many steps) over every live replica."""
    import ray

    from serving.runtime_status import REPLICA_PREFIX

    def account(actor, rid):  # runs in the replica's process (pickled by value: a local function)
        from serving import runtime_status

        total = steps = 0
        for core in list(runtime_status._cores):
            for executor in getattr(core.backend, "executors", {}).values():
                engine = getattr(executor.runner, "engine", None)
                for step in list(getattr(engine, "steps", [])):
                    for sid, share in zip(step.request_ids, step.shares_ns, strict=True):
                        if sid == rid:
                            total, steps = total + share, steps + 1
        return total, steps

    refs = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and actor["name"].startswith(REPLICA_PREFIX):
            refs.append(
                ray.get_actor(actor["name"], namespace="serve").__ray_call__.remote(account, request_id)
            )
    found = ray.get(refs, timeout=60)
    return sum(t for t, _ in found), sum(s for _, s in found)


def test_a_stream_left_on_the_models_own_route_is_charged_every_step_the_engine_ran(hfi_service):
    tag = f"leave-ray-{uuid.uuid4().hex[:8]}"
    body = {
        "inputs": "Once upon a time, in a land far away,",
        "parameters": {"max_new_tokens": 200},
        "stream": True,
    }
    events = 0
    with (
        httpx.Client(base_url=hfi_service.url, timeout=120) as c,
        c.stream("POST", f"/models/{LLM_ID}", json=body, headers={"x-request-id": tag}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events += 1
                if events == 3:
                    break  # the client leaves: closing the response drops the connection
    assert events == 3
    (charge,) = _charge(hfi_service.database_url, tag)
    assert charge.usage.status == STATUS_CLIENT_DISCONNECTED
    shares, steps = _engine_account(tag)  # settled once the engine dropped it: its account is complete
    assert charge.usage.compute_ns == shares > 0
    assert (
        3 <= steps < 200
    )  # the steps after its third token are in the charge; it stopped long before the end
