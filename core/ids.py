"""Time-ordered (version 7) UUIDs for the request path: inference ids and batch ids, random bits drawn from a
buffer of `os.urandom` bytes.

Version 7 (RFC 9562): the Unix time in milliseconds, then 74 random bits. Ids made later sort later (to the
millisecond), so the ledger's unique index on the request id, and its batch index, take each new charge at their
end instead of at a random place: measured with SQLite on the ledger's table and its six indexes, 10.5-11 us an
insert at 100,000 and at 1,000,000 rows, against 16 and 32 us with random (version 4) ids, whose cost grows with
the table as its index pages stop fitting in the cache (benchmarks/README.md); on PostgreSQL (the test cluster,
200,000 rows, client and server) 24.8 us against 28.5, the indexes still in its buffers there. The ids stay
unique by their random bits; they tell when a request started, to the millisecond, which the ledger records
anyway.

The random bits: `os.urandom` lets go of the GIL around its `getrandom` call. On a model replica the event loop
shares the GIL with the model's thread, so taking it back means waiting for that thread: profiled under load
(benchmarks/peers.py, MiniLM at 16 clients) the call took about 0.3 ms on the event loop, against 4 us alone, and
was the loop's largest single frame. Here one `os.urandom` call serves hundreds of ids. A forked child starts a
buffer of its own.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_DRAW_BYTES = 4096
_RANDOM_BYTES = 10  # 80 bits drawn, 74 used (12 of rand_a, 62 of rand_b)
_lock = threading.Lock()
_buffer = b""
_position = 0


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7, variant RFC 4122): 48 bits of Unix milliseconds, then random."""
    global _buffer, _position
    millis = time.time_ns() // 1_000_000
    with _lock:
        if _position + _RANDOM_BYTES > len(_buffer):
            _buffer, _position = os.urandom(_DRAW_BYTES), 0
        chunk = _buffer[_position : _position + _RANDOM_BYTES]
        _position += _RANDOM_BYTES
    rand = int.from_bytes(chunk, "big")
    value = (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version
        | ((rand >> 62) & 0xFFF) << 64  # rand_a
        | 0b10 << 62  # variant
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)  # rand_b
    )
    return uuid.UUID(int=value)


def _forget_after_fork() -> None:
    global _buffer, _position, _lock
    _buffer, _position, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
