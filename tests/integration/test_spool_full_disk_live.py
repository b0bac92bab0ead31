"""A really full disk under a Ray Serve replica's spool: a model application on the session's Ray instance, its
spool on a small tmpfs of its own, filled up while it serves. The replica answers until its spool file's
preallocated space is used up, then the request whose charge the disk refused is answered and its charge held,
and every later one gets 503 with Retry-After; once space is freed, the held charge is written and requests run
again. The ledger then holds exactly one charge per 200, and none for a 503.

Mounting a tmpfs needs root (CAP_SYS_ADMIN): elsewhere this test is skipped, and tests/integration/
test_spool_full_disk.py (the same path in process, the disk's refusals made at the system call) still runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from metering.ledger import Ledger

MODEL = "local/tiny-sentiment"
MOUNT = "/fulldisk"
TMPFS_SIZE = "3m"  # the replica's spool file preallocates 1 MiB; the rest is filled by the test


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory):
    where = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def app_on_small_disk(hfi_service, small_disk: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny classifier's own application at /fulldisk (no router: HAProxy routes `/fulldisk/models/...`
    straight to it), its spool on the small disk, its ledger on the test's disk. On a copy of cpu-basic that
    reserves a twentieth of a logical CPU: the session's services hold the rest."""
    from ray import serve

    from hardware_profiles import load_profiles
    from serving.app import MODEL_IMPORT_PATH, applications

    work = tmp_path_factory.mktemp("fulldisk")
    profile = load_profiles().get("cpu-basic").model_dump(mode="json", exclude_none=True)
    profile.update(name="cpu-basic-fulldisk-test", cpus=0.05)
    spec = {
        "id": MODEL,
        "task": "text-classification",
        "source": {"path": "tiny-sentiment", "prepare": "tiny-sentiment"},
        "hardware_profile": profile["name"],
        "dtype": "float32",
    }
    database_url = f"sqlite:///{work / 'ledger.db'}"
    args = {
        **hfi_service.args,
        "models": [spec],
        "profiles": [profile],
        "route_prefix": MOUNT,
        "metering": {"database_url": database_url, "spool_dir": str(small_disk / "spool")},
    }
    (app,) = [a for a in applications(args) if a.import_path == MODEL_IMPORT_PATH]
    serve.run_many(
        [serve.RunTarget(app.build(), name=app.name, route_prefix=app.route_prefix)],
        wait_for_applications_running=False,
    )
    try:
        deadline = time.monotonic() + 180
        while serve.status().applications[app.name].status != "RUNNING":
            assert time.monotonic() < deadline, serve.status().applications[app.name]
            time.sleep(0.5)
        yield f"{hfi_service.url}{MOUNT}/models/{MODEL}", database_url
    finally:
        serve.delete(app.name)


async def post_many(url: str, n: int, clients: int = 8) -> list[httpx.Response]:
    """`n` requests from `clients` concurrent callers."""
    out: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def caller(count: int) -> None:
            for _ in range(count):
                out.append(await client.post(url, json={"inputs": "I love it"}))

        await asyncio.gather(*(caller(n // clients) for _ in range(clients)))
    return out


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with a file of zeros; the file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        block = bytes(64 * 1024)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    for size in (4096, 512, 1):  # what a 64 KiB write could not take
        try:
            with open(filler, "ab") as f:
                while True:
                    f.write(bytes(size))
                    f.flush()
        except OSError:
            continue
    return filler


def ledger_ids(database_url: str) -> set[str]:
    ledger = Ledger(database_url)
    try:
        return {c.request_id for c in ledger.charges()}
    finally:
        ledger.close()


def test_a_full_spool_disk_under_a_serve_replica_holds_the_charge_refuses_then_recovers(
    app_on_small_disk, small_disk: Path
) -> None:
    url, database_url = app_on_small_disk
    first = httpx.post(url, json={"inputs": "I love it"}, timeout=60)
    assert first.status_code == 200, first.text
    filler = fill(small_disk)
    answered = [first]
    refused: list[httpx.Response] = []
    for _ in range(40):  # 1 MiB of preallocated spool at about 800 bytes a charge: some 1,300 requests
        batch = asyncio.run(post_many(url, 80))
        assert {r.status_code for r in batch} <= {200, 503}, {r.status_code for r in batch}
        answered += [r for r in batch if r.status_code == 200]
        refused += [r for r in batch if r.status_code == 503]
        if refused:
            break
    assert refused, f"the spool never filled up after {len(answered)} requests"
    assert "cannot record charges" in refused[0].json()["error"] and refused[0].headers["retry-after"] == "1"
    health = httpx.get(f"{url}/health", timeout=30).json()  # the model's replica: it meters its own requests
    assert health["status"] == "degraded" and health["unspooled_charges"] >= 1, health
    assert httpx.post(url, json={"inputs": "still full"}, timeout=60).status_code == 503  # nothing runs
    filler.unlink()  # space again: the held charge is written within a second or so
    deadline = time.monotonic() + 30
    while (again := httpx.post(url, json={"inputs": "I love it"}, timeout=60)).status_code != 200:
        assert again.status_code == 503 and time.monotonic() < deadline, again.text
        time.sleep(0.2)
    answered.append(again)
    ids = {r.headers["inference-id"] for r in answered}
    deadline = time.monotonic() + 60
    while not ids <= (in_ledger := ledger_ids(database_url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert in_ledger == ids  # every answered request once (the held ones too); no refused one
