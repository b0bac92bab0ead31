"""Random (version 4) UUIDs for the request path, drawn from a buffer of `os.urandom` bytes.

`uuid.uuid4()` calls `os.urandom(16)` for every id, and `os.urandom` lets go of the GIL around its `getrandom`
call. On a model replica the event loop shares the GIL with the model's thread, so taking it back means waiting
for that thread: profiled under load (benchmarks/peers.py, MiniLM at 16 clients) the call took about 0.3 ms on the
event loop, against 4 us alone, and was the loop's largest single frame. Here one `os.urandom` call serves 256 ids:
the same source of randomness, the same version and variant bits. A forked child starts a buffer of its own.
"""

from __future__ import annotations

import os
import threading
import uuid

_IDS_PER_DRAW = 256
_lock = threading.Lock()
_buffer = b""
_position = 0


def uuid4() -> uuid.UUID:
    """A random UUID, as `uuid.uuid4()`."""
    global _buffer, _position
    with _lock:
        if _position >= len(_buffer):
            _buffer, _position = os.urandom(16 * _IDS_PER_DRAW), 0
        chunk = _buffer[_position : _position + 16]
        _position += 16
    return uuid.UUID(bytes=chunk, version=4)


def _forget_after_fork() -> None:
    global _buffer, _position, _lock
    _buffer, _position, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
