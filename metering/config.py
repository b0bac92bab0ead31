"""Metering settings: where charges go. Part of the service settings (serving/config.py).

Every field is optional with a default that works on a laptop: SQLite ledger and spool under
~/.local/share/hfi, no usage events, no collector.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.db import expand_sqlite_url

DEFAULT_DATABASE_URL = "sqlite:///~/.local/share/hfi/ledger.db"


class MeteringSettings(BaseModel):
    """Where charges are spooled, stored and streamed, and how often."""

    model_config = ConfigDict(extra="forbid")

    # False: record() only prices (headers still work); nothing is spooled, stored or streamed.
    enabled: bool = True
    # SQLite by default (nothing to set up; `~` is expanded and the directory created);
    # postgresql+psycopg://user@host/db for a cluster.
    database_url: str = DEFAULT_DATABASE_URL
    spool_dir: str = "~/.local/share/hfi/spool"
    # fsync each spool append before record() returns (concurrent callers share one fsync). False trades the
    # crash guarantee (a power cut may lose the last charges) for latency.
    spool_fsync: bool = True
    # The ingress's charges are fsync'd by a small child process, one fdatasync for each event-loop iteration's
    # charges, so that the event loop goes on serving meanwhile (metering/syncer.py). False, or if it fails: a
    # worker thread runs that fdatasync.
    spool_sync_process: bool = True
    # ... unless the disk is quick: while the loop's own syncs typically take less than this (the median of its last
    # 15: a spike is no slow disk; the test VM's local disk: 0.2-0.3 ms), the loop runs them itself, which costs a
    # request less than the hand-over to the child and back; a slower disk (a network volume) goes to the child, and
    # the loop retries its own twice a second. 0: never.
    spool_inline_sync_below_s: float = Field(default=0.001, ge=0)
    # A write that must be on disk before it returns (the loop's own, a thread's `record`) is one write with direct
    # I/O (O_DIRECT | O_DSYNC: no page cache, no separate fdatasync) where the filesystem takes it: on the test VM's
    # disk about half the CPU, and back to back 0.09 ms instead of 0.14 ms (writes milliseconds apart: about the
    # same time either way). False, or a filesystem without it: write + fdatasync.
    spool_direct_io: bool = True
    # A spool file is closed, and a new one started, once it holds this many bytes of charges (about 640 bytes
    # each, measured); a closed file is deleted once delivered.
    spool_rotate_bytes: int = Field(default=32 * 1024 * 1024, ge=4096)
    # The node drainer's CPU priority (`nice`, 0-19): it delivers charges that are on disk already, so it runs in
    # the time the serving processes leave, never ahead of a request. Ray starts its workers (the replicas) at nice
    # 15 (Ray's `worker_niceness`), so only a value above that puts the drainer behind them. 0: normal.
    drainer_nice: int = Field(default=19, ge=0, le=19)
    # While charges this process priced wait in memory because its spool could not write them (a full disk, an
    # I/O error: retried every second), new requests get 503 with Retry-After instead of running, so no compute is
    # given away without a durable charge. False: they run, and their charges wait in memory too (lost if the
    # process dies before the disk is back; each is logged whole, to recover it from the log).
    refuse_when_unspooled: bool = True
    # How often the background threads look for new charges, and how many they move at once.
    drain_interval_s: float = Field(default=1.0, gt=0)
    drain_batch_size: int = Field(default=500, ge=1)
    # Back-off between retries when the database or the collector fails: doubles from initial to max.
    retry_initial_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=10.0, gt=0)
    # close() waits this long for the spool to drain; what is left is replayed at the next start.
    close_timeout_s: float = Field(default=5.0, ge=0)
    # How often the ledger consumer re-scans the spool directory for files of processes gone since the start (a
    # deleted pod's spool on a shared hostPath or claim) and adopts them; 0: only at start.
    adopt_interval_s: float = Field(default=30.0, ge=0)
    # The least a request that ran any compute on a priced profile costs, in nano-USD (1: the smallest unit of the
    # cost look-up, so no answered request is free). A batch's charges add up to its cost plus these top-ups.
    min_charge_nanousd: int = Field(default=1, ge=0)
    # Usage events (CloudEvents 1.0): `source` of each event, a JSON-lines file, an HTTP collector.
    events_source: str = "hf-inference-backend"
    events_type: str = "inference.usage"
    events_file: str | None = None
    collector_url: str | None = Field(default=None, description="e.g. http://openmeter:8888/api/v1/events")
    collector_token: str | None = Field(default=None, description="sent as Authorization: Bearer")
    collector_batch_size: int = Field(default=100, ge=1)
    collector_timeout_s: float = Field(default=10.0, gt=0)
    # The Hugging Face provider billing endpoint (POST {"requestIds": [...]}) accepts only this secret;
    # None disables the endpoint.
    provider_secret: str | None = None
    cost_lookup_max_ids: int = Field(default=1000, ge=1)

    def resolved_database_url(self) -> str:
        """The database URL with `~` expanded in a SQLite path (whose directory is created by the ledger)."""
        return expand_sqlite_url(self.database_url)

    def resolved_spool_dir(self) -> Path:
        return Path(self.spool_dir).expanduser()
