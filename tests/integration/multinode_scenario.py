"""A two-node Ray cluster on one machine, run as a script: tests/integration/test_multinode.py runs it in a
subprocess (the test session's own Ray instance must stay the only one in the pytest process) and reads the JSON
object it prints as its last line of stdout.

The cluster, started with Ray's own test helper `ray.cluster_utils.Cluster`, each node its own raylet:
- the head (the machine's address, 2 logical CPUs): the Serve controller, the router application, the CPU model;
- a second node shaped like the Helm chart's worker pod for the `nvidia-l4` profile: 8 logical CPUs, one logical
  GPU, the `accelerator_type:L4` resource, and an address of its own (127.0.0.2), as a second machine has.
Both nodes are up before the service is deployed by `serving.local.start` (the applications of
`serving.app.applications`) with HAProxy on every node, `host: 0.0.0.0` and `cpu_replicas_on_gpu_nodes: never`
as in the chart. The second node carries the `ray.io/accelerator-type: L4` node label, which Ray sets on a node
where it detects an L4 (given here through RAY_OVERRIDE_LABELS, the variable Ray reads labels from): the router
and the CPU model keep off it by that label, so that they cannot take the CPUs the L4 model needs there.

The second node has no GPU: its model is `local/tiny-sentiment` under another id, on the real `nvidia-l4` profile
(placement and price) with `device: cpu` (the catalog's setting that forces the device), so a CPU runner stands in
for the GPU there.

What it records (`checks`):
1. placement: where each application's replica runs (Serve's own details), and which replicas' demand (resources
   and label selector) the L4 node could take;
2. cross-node HAProxy: each node's HAProxy (the head's on the service port, the second's on
   RAY_SERVE_WORKER_PROXY_HTTP_PORT), at its node's address, answers the model whose replica is on the *other*
   node, and forwards to that node's address;
3. spooled on the second node, delivered: the L4 model's charges are in its replica's spool file and reach the
   ledger (SQLite in the work directory; the spool directory is shared by both nodes, as on one machine, or a
   ReadWriteMany claim);
4. the second node's raylet killed: requests answered by the L4 model while the ledger refuses writes (the
   script holds SQLite's write lock, as in a database outage) so that none of their charges can have left the
   second node's spool; then SIGKILL to its raylet, its processes gone, the lock released. The head's processes
   adopt the dead node's spool file (`metering.adopt_interval_s`: 1 s here) and deliver every charge once.

Isolation from everything else on the machine: its own Ray temp directory under /tmp (RAY_TMPDIR too, so that
Ray's "current cluster" address file is not the machine's), free ports for everything that listens (the two
HAProxy frontends, their stats and metrics listeners, the head's fallback proxy), a replica port range of its
own, and a teardown that ends only what it started, by pid (its nodes' processes and what their raylets
started, then any HAProxy of its nodes left behind), never `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import traceback
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil

CPU_MODEL = "local/tiny-sentiment"
L4_MODEL = "local/tiny-sentiment-l4"
L4_PROFILE = "nvidia-l4"
SECOND_NODE_IP = "127.0.0.2"  # a loopback address of its own for the second node (Linux routes 127/8 locally)
# Ray's default base of each node's HAProxy files (<base>/<node id>/: configuration, admin socket, logs)
HAPROXY_DIR = Path("/tmp/haproxy-serve")


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def replica_ports(pid: int) -> dict[str, str]:
    """A range of replica ports for this run, below the test session's own (serving.local's, from 20000)."""
    from serving.local import replica_port_range

    return replica_port_range(pid, first=10000, width=100)


def model(model_id: str, profile: str, **extra: Any) -> dict[str, Any]:
    """A catalog entry serving the tiny test classifier (built into the model store on first use)."""
    return {
        "id": model_id,
        "task": "text-classification",
        "source": {"path": "tiny-sentiment", "prepare": "tiny-sentiment"},
        "hardware_profile": profile,
        "dtype": "float32",
        "replicas": 1,
        "max_ongoing_requests": 16,
        **extra,
    }


def settings_args(
    work: Path, model_store: str, port: int, *, host: str = "0.0.0.0", adopt_interval_s: float = 1
) -> dict[str, Any]:
    """The service's settings: two models, one placed on the fake L4 by its profile; SQLite ledger, shared spool."""
    return {
        # 0.0.0.0 as in the Helm chart's Serve config: replicas bind (and HAProxy listens) on all interfaces, so
        # that HAProxy on another node reaches them. (127.0.0.1, `hfi serve`'s default, binds them to loopback.)
        "host": host,
        "port": port,
        "model_store": model_store,
        "offline": True,
        "model_wait_timeout_s": 120,
        "cpu_replicas_on_gpu_nodes": "never",  # the chart's setting
        "models": [
            model(CPU_MODEL, "cpu-basic"),
            # A CPU runner stands in for the L4: `device: cpu` forces the device; placement and price stay L4's.
            model(L4_MODEL, L4_PROFILE, device="cpu"),
        ],
        "metering": {
            "database_url": f"sqlite:///{work / 'ledger.db'}",
            "spool_dir": str(work / "spool"),
            "adopt_interval_s": adopt_interval_s,  # a dead node's spool adopted within a second (default 30 s)
            "retry_initial_s": 0.1,
            "retry_max_s": 1,
        },
    }


class Scenario:
    """The cluster, the service on it, the checks, and the teardown (see the module docstring)."""

    def __init__(self, work: Path, model_store: str, **settings: Any) -> None:
        self.work = work
        self.model_store = model_store
        self.settings = settings  # settings_args' keywords
        self.result: dict[str, Any] = {"checks": {}}
        self.cluster: Any = None
        self.worker: Any = None
        self.node_ids: list[str] = []
        self.head_port = free_port()
        self.worker_port = free_port()
        # node id -> its address (its HAProxy and replicas are reached there), its HAProxy's HTTP port
        self.node_ips: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.db_path = work / "ledger.db"
        self.killed_tree: list[psutil.Process] = []  # the second node's processes when its raylet was killed

    # Start

    def start_head(self) -> None:
        """The head node: two logical CPUs, room for the router and the CPU model, no GPU."""
        from ray.cluster_utils import Cluster

        from serving.local import apply_serve_env

        os.environ["RAY_TMPDIR"] = str(self.work)  # Ray's address file and defaults stay in our directory
        for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ[key] = str(free_port())  # the head's HAProxy: never ports another service took
        self.result["haproxy"] = apply_serve_env(True)  # HAProxy on (Linux), as `hfi serve` turns it on
        # The head's fallback Python proxy listens on 8500 by default: another service on this machine has it.
        os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_port())
        # Replicas take HTTP on ports of a fixed range (30000-31000) in every Ray instance: with another instance
        # on this machine, a port one of ours frees could be taken by one of theirs, and our HAProxy would send
        # it our requests. A range of our own (both nodes share it; each skips a port the other holds).
        os.environ.update(replica_ports(os.getpid()))
        head_args = {"num_cpus": 2, "include_dashboard": False, "temp_dir": str(self.work / "ray")}
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        head = self.cluster.head_node
        self.node_ids.append(head.node_id)
        self.node_ips[head.node_id] = head.node_ip_address
        self.ports[head.node_id] = self.head_port

    def add_l4_node(self) -> None:
        """The second node, shaped like the Helm chart's worker pod for the nvidia-l4 profile: the profile's 8
        logical CPUs, one GPU, the `accelerator_type:L4` resource that `accelerator_type="L4"` asks for, and the
        node label Ray gives a node where it detects an L4."""
        # Its processes inherit this environment when its raylet starts: its HAProxy takes its own HTTP port
        # (Ray's per-worker-node override) and its own stats and metrics ports.
        node_env = {
            "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.worker_port),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_OVERRIDE_LABELS": json.dumps({"ray.io/accelerator-type": "L4"}),
        }
        saved = {key: os.environ.get(key) for key in node_env}
        os.environ.update(node_env)
        try:
            self.worker = self.cluster.add_node(
                num_cpus=8,
                num_gpus=1,
                resources={"accelerator_type:L4": 1},
                # An address of its own (the head has the machine's): as two machines have, so that a request
                # from one node's HAProxy to the other's replicas really goes to the other node's address.
                node_ip_address=SECOND_NODE_IP,
                include_dashboard=False,
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.node_ids.append(self.worker.node_id)
        self.node_ips[self.worker.node_id] = SECOND_NODE_IP
        self.ports[self.worker.node_id] = self.worker_port
        self.cluster.wait_for_nodes()

    def deploy(self) -> None:
        """Deploy the service with `serving.local.start` on both nodes (see check_placement)."""
        import ray

        from serving import local

        ray.init(address=self.cluster.address, include_dashboard=False, log_to_driver=False)
        started = time.monotonic()
        local.start(settings_args(self.work, self.model_store, self.head_port, **self.settings))
        self.result["deploy_s"] = round(time.monotonic() - started, 1)

    @property
    def l4_app(self) -> str:
        from models.catalog import ModelSpec

        return ModelSpec.model_validate(model(L4_MODEL, L4_PROFILE)).deployment_name

    # Checks

    def deployments(self) -> dict[str, dict[str, Any]]:
        """app name -> {"replicas": [{node_id, pid, state}], "ray_actor_options": ...} (Serve's own details)."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        found: dict[str, dict[str, Any]] = {}
        for app_name, app in details.get("applications", {}).items():
            for deployment in app.get("deployments", {}).values():
                found[app_name] = {
                    "replicas": [
                        {
                            "node_id": r.get("node_id"),
                            "pid": r.get("pid"),
                            "state": r.get("state"),
                            "replica_id": r.get("replica_id"),
                        }
                        for r in deployment.get("replicas", [])
                    ],
                    "ray_actor_options": deployment.get("deployment_config", {}).get("ray_actor_options", {}),
                }
        return found

    def check_placement(self) -> None:
        """Where each replica runs, and whether the L4 node could take the replicas that ask for no GPU.

        Serve places replicas with Ray's SPREAD strategy, which alone does not keep CPU work off GPU nodes: a
        replica that fits may land there (seen here before the label selector: the cpu-basic replica took one of
        the L4 node's 8 CPUs and the L4 replica, which needs all 8, stayed pending). Where a replica landed can
        be luck, so the check is also whether its demand (resources and label selector) admits the L4 node."""
        import ray

        head, second = self.node_ids
        deployments = self.deployments()
        where = {name: [r["node_id"] for r in d["replicas"]] for name, d in deployments.items()}
        self.l4_pid = deployments[self.l4_app]["replicas"][0]["pid"]
        l4_node = next(n for n in ray.nodes() if n["NodeID"] == second)
        fits = {
            name: _fits(_demand(d["ray_actor_options"]), l4_node["Resources"])
            and _selects(d["ray_actor_options"], l4_node.get("Labels") or {})
            for name, d in deployments.items()
            if name != self.l4_app
        }
        self.result["checks"]["placement"] = {
            "head_node": head,
            "second_node": second,
            "l4_node_resources": l4_node["Resources"],
            "l4_node_labels": l4_node.get("Labels"),
            "nodes": where,
            "demands": {name: _demand(d["ray_actor_options"]) for name, d in deployments.items()},
            "l4_model_nodes": where.get(self.l4_app),
            "cpu_model_nodes": where.get(self.cpu_app),
            "cpu_replicas_that_fit_the_l4_node": sorted(name for name, ok in fits.items() if ok),
        }

    @property
    def cpu_app(self) -> str:
        from models.catalog import ModelSpec

        return ModelSpec.model_validate(model(CPU_MODEL, "cpu-basic")).deployment_name

    def post(self, node: str, model_id: str, text: str) -> httpx.Response:
        """POST to `node`'s HAProxy, at that node's own address and HTTP port."""
        url = f"http://{self.node_ips[node]}:{self.ports[node]}/models/{model_id}"
        return httpx.post(url, json={"inputs": text}, timeout=60)

    def check_cross_node(self) -> None:
        """Each node's HAProxy answers the model whose only replica is on the other node, at that node's address:
        the nodes have distinct addresses (the second is 127.0.0.2), so HAProxy cannot take a replica of the other
        node for one of its own (to which it would connect on 127.0.0.1)."""
        head, second = self.node_ids
        deployments = self.deployments()
        replica_ids = {app: [r["replica_id"] for r in d["replicas"]] for app, d in deployments.items()}
        via_head = [self.post(head, L4_MODEL, f"head to L4 {i}") for i in range(3)]
        via_second = [self.post(second, CPU_MODEL, f"second to CPU {i}") for i in range(3)]
        via_second_l4 = [self.post(second, L4_MODEL, f"second to L4 {i}") for i in range(2)]
        # Each node's HAProxy rewrites its configuration when Serve's routing table reaches it, which can trail
        # the replicas' start on a loaded machine: read it once it names both replicas (or after 90 s; a full
        # `make test` once had it unnamed after 30).
        deadline = time.monotonic() + 90
        while True:
            configs = {node: _haproxy_config(node) for node in self.node_ids}
            named = _server_addresses(configs[head], replica_ids[self.l4_app]) and _server_addresses(
                configs[second], replica_ids[self.cpu_app]
            )
            if named or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.answered_l4 = [r for r in via_head + via_second_l4 if r.status_code == 200]
        self.result["checks"]["cross_node"] = {
            "node_ips": self.node_ips,
            "ports": self.ports,
            "head_haproxy_binds_head_port": _binds(configs[head], self.ports[head]),
            "second_haproxy_binds_second_port": _binds(configs[second], self.ports[second]),
            # where each HAProxy sends the other node's replica: address:port from its `server` line
            "head_haproxy_to_l4_replica": _server_addresses(configs[head], replica_ids[self.l4_app]),
            "second_haproxy_to_cpu_replica": _server_addresses(configs[second], replica_ids[self.cpu_app]),
            "replica_listen": {
                app: _listening(d["replicas"][0]["pid"]) for app, d in deployments.items() if d["replicas"]
            },
            "head_to_l4": [_summary(r) for r in via_head],
            "second_to_cpu": [_summary(r) for r in via_second],
            "second_to_l4": [_summary(r) for r in via_second_l4],
        }

    def check_spooled_delivered(self) -> None:
        """The L4 replica's charges are in its own spool file (named by its pid) and reach the ledger."""
        ids = [r.headers["inference-id"] for r in self.answered_l4]
        spool_files = sorted((self.work / "spool").glob(f"*-{self.l4_pid}-*.jsonl"))
        spooled = _ids_in(spool_files)
        rows = _wait_rows(self.db_path, ids, timeout_s=60)
        self.result["checks"]["spooled_delivered"] = {
            "answered": ids,
            "l4_spool_files": [p.name for p in spool_files],
            "in_l4_spool": sorted(set(ids) & spooled),
            "ledger": rows,
            "header_costs": {r.headers["inference-id"]: _nanousd(r) for r in self.answered_l4},
        }

    def check_kill(self, requests: int = 12) -> None:
        """Answered while the ledger is write-locked, then the second node's raylet killed: every charge lands.

        Holding SQLite's write lock (as a database outage would) keeps every one of these charges in the L4
        replica's spool until that replica is gone: only another process can deliver them then, by adopting its
        spool file. Without the lock, the replica's own drain (every second) could deliver them before the kill,
        and the check would prove nothing."""
        lock = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # no process can write the ledger until we let go
        try:
            answered = [
                self.post(self.node_ids[i % 2], L4_MODEL, f"before the kill {i}") for i in range(requests)
            ]
            ok = [r for r in answered if r.status_code == 200]
            ids = [r.headers["inference-id"] for r in ok]
            spool_files = sorted((self.work / "spool").glob(f"*-{self.l4_pid}-*.jsonl"))
            found = {
                "statuses": [r.status_code for r in answered],
                "answered": ids,
                "header_costs": {r.headers["inference-id"]: _nanousd(r) for r in ok},
                "in_ledger_at_kill": sorted(_rows(lock, ids)),  # none can be: we hold the write lock
                "in_l4_spool_at_kill": sorted(set(ids) & _ids_in(spool_files)),
                **self.kill_second_raylet(),
            }
        finally:
            lock.close()  # rolls back: the ledger takes writes again
        found["ledger"] = _wait_rows(self.db_path, ids, timeout_s=90)
        found["l4_spool_left"] = _wait_removed(spool_files, timeout_s=30)
        self.result["checks"]["kill"] = found

    def kill_second_raylet(self) -> dict[str, Any]:
        """SIGKILL the second node's raylet, then wait for the processes it started to end."""
        raylet = self.worker.all_processes["raylet"][0].process  # our child: Cluster started it
        tree = psutil.Process(raylet.pid).children(recursive=True)
        self.killed_tree = tree
        # HAProxy is a child of its manager, started without a parent-death signal: whether it ends with the
        # node's Ray workers is reported apart.
        haproxy = [p for p in tree if "haproxy" in p.name()]
        workers = [p for p in tree if p not in haproxy]
        described = [_describe(p) for p in workers]
        os.kill(raylet.pid, signal.SIGKILL)
        # Reap it at once, as init does for a daemonized raylet (`ray start`): its workers watch the raylet's pid,
        # which a zombie still holds, and would live on until the GCS declared the node dead.
        raylet.wait()
        gone_s = _wait_gone(workers, timeout_s=60)
        return {
            "killed_raylet_pid": raylet.pid,
            "killed_processes": described,
            "processes_gone_s": gone_s,
            "survivors": [_describe(p) for p in workers if _alive(p)],
            "haproxy_after_kill": [_describe(p) for p in haproxy if _alive(p)],
        }

    # Teardown: only what this script started

    def teardown(self) -> None:
        """End what this script started, by pid: the driver, both nodes' Ray processes and every process their
        raylets started (replicas, HAProxy managers, HAProxy itself, the spool's sync processes). Serve is not
        shut down gracefully first: with a node lost it waits its full 30 s for a replica that is gone."""
        steps: dict[str, Any] = {}
        started = time.monotonic()
        tree = list(self.killed_tree)
        for node in self.cluster.list_all_nodes() if self.cluster is not None else []:
            raylet = node.all_processes.get("raylet", [None])[0]
            if raylet is not None and raylet.process.poll() is None:
                tree += psutil.Process(raylet.process.pid).children(recursive=True)
        try:
            import ray

            ray.shutdown()
        except Exception as err:
            steps["ray_shutdown_error"] = repr(err)
        if self.cluster is not None:
            try:
                self.cluster.shutdown()  # each node's raylet, GCS, ... killed and reaped
            except Exception as err:
                steps["cluster_shutdown_error"] = repr(err)
        if _wait_gone(tree, timeout_s=20) is None:
            steps["killed_after_20s"] = [_describe(p) for p in tree if _alive(p)]
            for proc in tree:
                try:
                    proc.kill()  # psutil refuses a pid reused by another process since
                except psutil.NoSuchProcess:
                    pass
        steps["haproxy_left_killed"] = _kill_haproxy(self.node_ids)
        for node in self.node_ids:
            shutil.rmtree(HAPROXY_DIR / node, ignore_errors=True)
        steps["teardown_s"] = round(time.monotonic() - started, 1)
        self.result["teardown"] = steps


def _demand(options: dict[str, Any]) -> dict[str, float]:
    """The Ray resources an actor with these options asks for (Ray's rules: accelerator_type is 0.001 of the
    `accelerator_type:<type>` resource)."""
    demand = {"CPU": float(options.get("num_cpus", 1))}
    if options.get("num_gpus"):
        demand["GPU"] = float(options["num_gpus"])
    if options.get("accelerator_type"):
        demand[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    if options.get("memory"):
        demand["memory"] = float(options["memory"])
    demand.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in demand.items() if v > 0}


def _fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    """Whether a node with these total resources can ever run an actor with this demand."""
    return all(node.get(key, 0) >= amount for key, amount in demand.items())


def _selects(options: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether an actor with these options may run on a node with these labels: its label selector matches them
    (Ray's operators: value, !value, in(a,b), !in(a,b); a missing label matches only the negative ones), or a
    fallback lets it go anywhere."""
    if options.get("fallback_strategy"):
        return True
    for key, want in (options.get("label_selector") or {}).items():
        negative = want.startswith("!")
        want = want.removeprefix("!")
        values = want[3:-1].split(",") if want.startswith("in(") else [want]
        if (labels.get(key) in {v.strip() for v in values}) == negative:
            return False
    return True


def _haproxy_config(node_id: str) -> str:
    path = HAPROXY_DIR / node_id / "haproxy.cfg"
    return path.read_text() if path.exists() else ""


def _server_addresses(config: str, replica_ids: list[str]) -> list[str]:
    """address:port of the HAProxy `server` lines of these replicas (the line names the replica's id)."""
    found = []
    for line in config.splitlines():
        words = line.split()
        if (
            words[:1] == ["server"]
            and len(words) > 2
            and any(words[1].endswith(f"-{r}") for r in replica_ids)
        ):
            found.append(words[2])
    return sorted(set(found))


def _listening(pid: int) -> list[str]:
    """The TCP addresses a process listens on."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN})


def _binds(config: str, port: int) -> bool:
    return any(
        line.split()[:1] == ["bind"] and line.rstrip().endswith(f":{port}") for line in config.splitlines()
    )


def _summary(r: httpx.Response) -> dict[str, Any]:
    return {
        "status": r.status_code,
        "profile": r.headers.get("x-compute-type"),
        "inference_id": r.headers.get("inference-id"),
        "body": r.text[:200] if r.status_code != 200 else None,
    }


def _nanousd(r: httpx.Response) -> int:
    return int(Decimal(r.headers["x-hfi-cost-usd"]) * 10**9)


def _ids_in(files: list[Path]) -> set[str]:
    ids = set()
    for path in files:
        for line in path.read_bytes().split(b"\n"):
            line = line.strip(b"\0").strip()
            if line:
                try:
                    ids.add(json.loads(line).get("request_id"))
                except ValueError:
                    pass
    return ids


def _rows(conn: sqlite3.Connection, ids: list[str]) -> dict[str, list[Any]]:
    """request id -> [count, cost_nanousd, hardware_profile] for the ids in the ledger."""
    try:
        marks = ",".join("?" * len(ids))
        query = (
            "SELECT request_id, count(*), max(cost_nanousd), max(hardware_profile) FROM metering_charges"
            f" WHERE request_id IN ({marks}) GROUP BY request_id"
        )
        return {r[0]: [r[1], r[2], r[3]] for r in conn.execute(query, ids)}
    except sqlite3.OperationalError:  # no table yet
        return {}


def _wait_rows(db_path: Path, ids: list[str], timeout_s: float) -> dict[str, list[Any]]:
    """The ledger's rows for `ids`, once all are there or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = sqlite3.connect(db_path, timeout=30)
        try:
            rows = _rows(conn, ids)
        finally:
            conn.close()
        if len(rows) == len(set(ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    """Whether this very process (not a later one with its pid) still runs."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> float | None:
    """Seconds until none of `procs` runs; None if some still run after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not any(_alive(p) for p in procs):
            return round(time.monotonic() - started, 2)
        time.sleep(0.05)
    return None


def _wait_removed(files: list[Path], timeout_s: float) -> list[str]:
    """The names of `files` still there once all are gone or `timeout_s` passed (an adopter deletes a spool file
    once every consumer has delivered it)."""
    deadline = time.monotonic() + timeout_s
    while any(p.exists() for p in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p.name for p in files if p.exists()]


def _serve_log_tails(ray_dir: Path, chars: int = 1500) -> dict[str, str]:
    """The end of Serve's controller and replica logs, and of any worker's error output: why a step failed."""
    tails = {}
    for log in sorted(ray_dir.glob("session_*/logs/serve/*.log")) + sorted(
        ray_dir.glob("session_*/logs/*.err")
    ):
        try:
            text = log.read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            tails[log.name] = text[-chars:]
    return tails


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.NoSuchProcess:
        return f"{proc.pid} (gone)"


def _kill_haproxy(node_ids: list[str]) -> list[str]:
    """SIGKILL the HAProxy processes of these nodes (their config path names the node) still running."""
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "haproxy" in cmdline and any(f"/{node}/" in cmdline for node in node_ids):
            try:
                proc.kill()
                killed.append(f"{proc.pid} {cmdline[:160]}")
            except psutil.NoSuchProcess:
                pass
    return killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", required=True)
    parser.add_argument(
        "--timeout-s", type=float, default=240, help="give up (and tear down) after this long"
    )
    # Settings that show the checks failing: --adopt-interval-s 0 (adoption only at a process's start: the dead
    # node's charges stay in its spool), --host 127.0.0.1 (replicas and HAProxy bound to loopback: the second
    # node's are not reachable at its address, and the deployment never becomes ready).
    parser.add_argument("--adopt-interval-s", type=float, default=1)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (Ray's logs) for a look")
    args = parser.parse_args()
    work = Path(
        tempfile.mkdtemp(prefix="hfimn-", dir="/tmp")
    )  # short: Ray's socket paths have a length limit
    scenario = Scenario(work, args.model_store, host=args.host, adopt_interval_s=args.adopt_interval_s)

    def give_up(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the scenario ran past {args.timeout_s} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.signal(signal.SIGTERM, give_up)
    signal.alarm(int(args.timeout_s))
    started = time.monotonic()
    try:
        for step in (
            scenario.start_head,
            scenario.add_l4_node,
            scenario.deploy,
            scenario.check_placement,
            scenario.check_cross_node,
            scenario.check_spooled_delivered,
            scenario.check_kill,
        ):
            scenario.result["step"] = step.__name__
            began = time.monotonic()
            step()
            scenario.result.setdefault("steps_s", {})[step.__name__] = round(time.monotonic() - began, 1)
        scenario.result["step"] = "done"
    except BaseException:
        scenario.result["error"] = traceback.format_exc()[-3000:]
        scenario.result["logs"] = _serve_log_tails(work / "ray")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, give_up)
        signal.alarm(60)  # the teardown too is bounded
        try:
            scenario.teardown()
        except BaseException:
            scenario.result.setdefault("teardown", {})["error"] = traceback.format_exc()[-2000:]
        signal.alarm(0)
        scenario.result["elapsed_s"] = round(time.monotonic() - started, 1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        sys.stdout.write(json.dumps(scenario.result, default=str) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
