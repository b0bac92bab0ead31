"""serving.local.probe_models: `hfi serve` says ready once each model with replicas of its own answers over the
public port (any HTTP answer counts, a 401 in tokens mode too); models loaded on demand are not asked."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.config import Settings
from serving.local import probe_models


def test_each_model_with_replicas_is_asked_until_it_answers(tmp_path):
    asked: list[str] = []
    refusals = {"n": 2}  # the first two asks find no route yet (HAProxy not told): 503, then answers

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            if "tiny-sentiment" in self.path and refusals["n"] > 0:
                refusals["n"] -= 1
                self.send_response(503)
            elif "MiniLM" in self.path:
                self.send_response(401)  # tokens mode: an answer all the same
            else:
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(
            "models:\n"
            "  - {id: local/tiny-sentiment, task: text-classification, source: {path: a}}\n"
            "  - {id: sentence-transformers/all-MiniLM-L6-v2, task: feature-extraction, source: {path: b}}\n"
            "  - {id: local/cold, task: text-classification, source: {path: c}, autoscaling: {min_replicas: 0}}\n"
        )
        settings = Settings.load({"port": server.server_address[1], "catalog_file": str(catalog)}, env={})
        probe_models(f"http://127.0.0.1:{settings.port}", settings, timeout_s=10)
    finally:
        server.shutdown()
    assert asked.count("/models/local/tiny-sentiment/health") == 3
    assert asked.count("/models/sentence-transformers/all-MiniLM-L6-v2/health") == 1
    assert not any("local/cold" in path for path in asked), (
        "a model scaled to zero is not started by the probe"
    )


def test_haproxy_listener_ports_are_free_and_below_the_ephemeral_range():
    """A kernel-chosen port (bind to 0) is an ephemeral one that an outgoing connection can take before HAProxy
    binds it: the local run picks its listener ports from 10000-19999, free when chosen, and skips a taken one."""
    import socket

    from serving import local

    keys = (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    )
    saved = dict(os.environ)
    try:
        for key in keys:
            os.environ.pop(key, None)
        if not local.apply_serve_env():
            pytest.skip("HAProxy does not ship for this platform")
        for key in keys:
            assert 10000 <= int(os.environ[key]) < 20000, key
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        assert local._free_port(port, port + 1) != port  # the only candidate is taken: the kernel chooses
