"""Ray itself places replicas that ask for no GPU as the settings say, on a one-node cluster whose only node has
an L4 (the `ray.io/accelerator-type: L4` label Ray gives such a node, set here through RAY_OVERRIDE_LABELS): one
GPU machine running everything.

- `cpu_replicas_on_gpu_nodes: fallback` (the default of `hfi serve`): the CPU replica and the router still run
  there, since no other node has room;
- `never` (the chart's): they stay pending, as they must where the cluster has CPU nodes for them.

tests/integration/test_multinode.py checks the other side: with a CPU node up, `never` keeps them off the L4 node.
The cluster runs in a subprocess: the test session's shared Ray instance must stay the only one in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
from ray.cluster_utils import Cluster
import ray
from serving.config import Settings

os.environ["RAY_OVERRIDE_LABELS"] = json.dumps({"ray.io/accelerator-type": "L4"})
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:L4": 1},
                    "include_dashboard": False, "temp_dir": sys.argv[1]},
)
del os.environ["RAY_OVERRIDE_LABELS"]
ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)

@ray.remote
class Replica:
    def node_labels(self):
        node = ray.get_runtime_context().get_node_id()
        return next(n.get("Labels", {}) for n in ray.nodes() if n["NodeID"] == node)

found = {}
try:
    for mode in ("fallback", "never"):
        settings = Settings.load({"cpu_replicas_on_gpu_nodes": mode}, env={})
        profiles = settings.profile_catalog()
        for who, profile in (("cpu-model", "cpu-basic"), ("router", None)):
            options = settings.actor_options(profiles, profile)
            options["num_cpus"] = 0.5
            actor = Replica.options(**options).remote()
            try:
                # One that may run starts in a second or two; one that may not stays pending: 8 s tells them apart.
                labels = ray.get(actor.node_labels.remote(), timeout=60 if mode == "fallback" else 8)
                found[f"{mode}/{who}"] = labels.get("ray.io/accelerator-type", "none")
            except ray.exceptions.GetTimeoutError:
                found[f"{mode}/{who}"] = "pending"
            ray.kill(actor)
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(found))
"""


def test_replicas_without_a_gpu_fall_back_to_the_only_gpu_node_unless_told_never():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "HFI_"))}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="hfigpu-", dir="/tmp") as work:  # short: Ray's socket paths
        # Ray's address file (RAY_TMPDIR/ray) in the cluster's own directory: /tmp/ray need not exist here
        env["RAY_TMPDIR"] = work
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, os.path.join(work, "ray")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"exit {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"
    assert json.loads(lines[-1]) == {
        "fallback/cpu-model": "L4",
        "fallback/router": "L4",
        "never/cpu-model": "pending",
        "never/router": "pending",
    }
