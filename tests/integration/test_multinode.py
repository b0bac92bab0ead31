"""The service on a Ray cluster of two nodes, both on this machine: placement by hardware profile, HAProxy on each
node reaching the replicas on the other, the second node's charges in the ledger, and none lost when that node's
raylet is killed.

The second node advertises a fake L4 (one logical GPU and the `accelerator_type:L4` resource); it has no GPU, so
the model placed there by the `nvidia-l4` profile runs a CPU runner (`device: cpu` in its catalog entry, the
setting that forces the device): a CPU runner stands in for the GPU on that node. Placement, the price (the L4's)
and everything around the model are what a real L4 node would see.

The cluster runs in a subprocess (tests/integration/multinode_scenario.py, Ray's own `Cluster` helper): the test
session's shared Ray instance must stay the only one in the pytest process. The script prints one JSON object with
what it saw; each test below checks one part of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.app import INGRESS_APP

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 240  # the script gives up after this and tears down (at most 60 s more)
L4_PROFILE = "nvidia-l4"


def run_scenario(model_store: Path, *extra: str) -> dict[str, Any]:
    """Run the scenario script with this venv's python; its last line of stdout is the result."""
    # Nothing of this session's Ray instance (its address, its HAProxy ports) or settings may reach the script.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HFI_"))}
    command = [sys.executable, str(SCENARIO), "--model-store", str(model_store)]
    proc = subprocess.Popen(
        [*command, "--timeout-s", str(SCENARIO_TIMEOUT_S), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ray's processes on it go with it if it must be killed
    )
    try:
        out, err = proc.communicate(timeout=SCENARIO_TIMEOUT_S + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the scenario hung past its own timeout and was killed; stderr:\n{err[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"the scenario printed no result (exit {proc.returncode}); stderr:\n{err[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def result(model_store: Path) -> dict[str, Any]:
    return run_scenario(model_store)


def check(result: dict[str, Any], name: str) -> dict[str, Any]:
    """One step's findings, or a failure that says where and why the scenario stopped."""
    if name not in result["checks"]:
        logs = "\n".join(f"--- {k}\n{v}" for k, v in result.get("logs", {}).items())
        pytest.fail(f"the scenario stopped at {result.get('step')}:\n{result.get('error')}\n{logs[-6000:]}")
    return result["checks"][name]


def test_the_scenario_ran_to_the_end_and_cleaned_up(result: dict[str, Any]) -> None:
    assert result["step"] == "done", result.get("error")
    assert result["haproxy"], "HAProxy is not available here: the cluster ran on Serve's Python proxy"
    teardown = result["teardown"]
    assert not {k for k in teardown if k.endswith("error")}, teardown


def test_a_model_whose_profile_asks_for_the_l4_lands_on_the_l4_node(result: dict[str, Any]) -> None:
    placement = check(result, "placement")
    assert placement["l4_model_nodes"] == [placement["second_node"]], placement
    # Both nodes were up before the deployment: the CPU model and the router run on the head, kept off the L4
    # node by its ray.io/accelerator-type label (see the next test).
    assert placement["cpu_model_nodes"] == [placement["head_node"]], placement
    assert set(placement["nodes"][INGRESS_APP]) == {placement["head_node"]}, placement


def test_a_replica_without_the_accelerator_cannot_land_on_the_l4_node(result: dict[str, Any]) -> None:
    """Without the label selector, the CPU model's and the router's demands fit the L4 node's 8 CPUs: one could
    take a CPU the L4 replica needs and leave it pending."""
    placement = check(result, "placement")
    assert placement["l4_node_labels"].get("ray.io/accelerator-type") == "L4", placement
    assert placement["cpu_replicas_that_fit_the_l4_node"] == [], placement["demands"]


def test_haproxy_on_each_node_reaches_the_replicas_on_the_other(result: dict[str, Any]) -> None:
    cross = check(result, "cross_node")
    head, second = check(result, "placement")["head_node"], check(result, "placement")["second_node"]
    ips = cross["node_ips"]
    assert ips[head] != ips[second], "the nodes must have addresses of their own"
    # The two ports are the two nodes' own HAProxy frontends (each node's HAProxy configuration binds its port).
    assert cross["head_haproxy_binds_head_port"] and cross["second_haproxy_binds_second_port"], cross
    # Each HAProxy forwards to the other node's replica at that node's address (not its own loopback) ...
    assert len(cross["head_haproxy_to_l4_replica"]) == len(cross["second_haproxy_to_cpu_replica"]) == 1, cross
    [to_l4] = cross["head_haproxy_to_l4_replica"]
    [to_cpu] = cross["second_haproxy_to_cpu_replica"]
    assert to_l4.rpartition(":")[0] == ips[second] and to_cpu.rpartition(":")[0] == ips[head], cross
    # ... and the answers come from there: the L4 replica through the head, the CPU replica through the second.
    assert [(r["status"], r["profile"]) for r in cross["head_to_l4"]] == [(200, L4_PROFILE)] * 3, cross
    assert [(r["status"], r["profile"]) for r in cross["second_to_cpu"]] == [(200, "cpu-basic")] * 3, cross
    assert [(r["status"], r["profile"]) for r in cross["second_to_l4"]] == [(200, L4_PROFILE)] * 2, cross


def test_charges_spooled_on_the_second_node_reach_the_ledger(result: dict[str, Any]) -> None:
    step = check(result, "spooled_delivered")
    answered = step["answered"]
    assert len(answered) == 5
    # Spooled by the L4 replica itself, on the second node (its spool file carries its pid) ...
    assert sorted(step["in_l4_spool"]) == sorted(answered), step
    # ... and in the ledger once each, at the L4's price, for what each answer's header said it cost.
    assert step["ledger"] == {rid: [1, step["header_costs"][rid], L4_PROFILE] for rid in answered}, step


def test_killing_the_second_nodes_raylet_loses_no_answered_charge(result: dict[str, Any]) -> None:
    step = check(result, "kill")
    answered = step["answered"]
    assert answered and step["statuses"] == [200] * len(answered), step["statuses"]
    # When the raylet was killed, none of these charges had left the second node: the ledger was write-locked
    # (as in a database outage) and they were all in the L4 replica's spool file ...
    assert step["in_ledger_at_kill"] == [], step
    assert sorted(step["in_l4_spool_at_kill"]) == sorted(answered), step
    # ... and the lock was let go only once every process of that node had ended,
    assert step["processes_gone_s"] is not None, (
        f"the node's processes outlived their raylet: {step['survivors']}"
    )
    # so a process on the head adopted the dead node's spool file and delivered each charge once, at its cost,
    assert step["ledger"] == {rid: [1, step["header_costs"][rid], L4_PROFILE] for rid in answered}, step
    # then deleted the file, as only its adopter does (its own process, had it lived, would have kept it).
    assert step["l4_spool_left"] == [], step
