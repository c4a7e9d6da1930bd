"""Crypto-shredding, proven: a backup taken before expiry, restored beside the key
store after it, holds the expired days' rows but nobody can read them or link
them to anyone, while a kept day still decrypts and links.

On both key stores: the file store (keys outside the database) and the PKCS#11
store, whose wrapped keys are in the database and so in the backup too; there the
restored backup is opened with the same HSM, and the expired days' wrapped keys
still do not open, because their HSM keys were destroyed.

The backup is a real `pg_dump` of the database (the Postgres binaries the
embedded cluster uses), restored with `pg_restore` into a new database of the
same cluster. Synthetic data only.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from cryptography.exceptions import InvalidTag

from services.kernel import db, hsm, keystores
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyError_, KeyStore, row_aad
from services.ops import pg
from tests.support.database import Cluster, Query
from tests.support.expiry_helpers import days_ago, own_keystore, run, seed_days


def dsn_for(cluster: Cluster, database: str) -> str:
    """The cluster's administrative DSN, pointed at `database`."""
    parts = urlsplit(cluster.admin_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def tool(name: str) -> str:
    return str(pg.find_bindir() / name)


@pytest.fixture(params=["file", "pkcs11"])
def store(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
) -> Iterator[tuple[Settings, KeyStore]]:
    """Settings with a key store of the test's own, on each backend, and that store
    (the PKCS#11 one reached as the Retention server reaches it)."""
    if request.param == "file":
        yield own_keystore(settings, tmp_path)
        return
    own = request.getfixturevalue("softhsm").settings(settings)
    made = keystores.open_for(own, db.SERVICE_ROLES["retention"])
    yield own, made
    made.close()


def hsm_reads(settings: Settings, dsn: str, names: list[str]) -> dict[str, bytes | Exception]:
    """Each day key as a host with the HSM and the database at `dsn` unwraps it
    (its bytes, or what refused it)."""

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    vault = hsm.HsmVault(
        hsm.Hsm(hsm.Pkcs11Config.from_settings(settings)), hsm.Database(connect), "restored"
    )
    found: dict[str, bytes | Exception] = {}
    try:
        for name in names:
            try:
                found[name] = vault.read("day", name)
            except KeyError_ as refused:
                found[name] = refused
    finally:
        vault.close()
    return found


def test_a_restored_backup_cannot_bring_back_expired_days(
    store: tuple[Settings, KeyStore], db_conn: Query, cluster: Cluster, tmp_path: Path
) -> None:
    settings, keystore = store
    on_hsm = settings.keystore_backend == "pkcs11"
    d31, d30, d20 = days_ago(31), days_ago(30), days_ago(20)
    visits = seed_days(db_conn, keystore, [d31, d30, d20], per_day=6, denied_per_day=1)

    dump = tmp_path / "before-expiry.dump"
    subprocess.run(
        [
            tool("pg_dump"),
            "--format=custom",
            f"--file={dump}",
            dsn_for(cluster, settings.database_name),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    result = run(settings, keystore, classes=["check_ins"])
    assert result.reports[0].destroyed_key_ids == [f"day-{d31}", f"day-{d30}"]

    restored = f"stopcovid_restored_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(cluster.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{restored}"'))
    try:
        subprocess.run(
            [tool("pg_restore"), "--no-owner", f"--dbname={dsn_for(cluster, restored)}", str(dump)],
            check=True,
            capture_output=True,
            timeout=120,
        )

        async def rows() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(dsn_for(cluster, restored))
            try:
                return list(
                    await conn.fetch(
                        "SELECT day, venue_id, device_id, sequence, person_ref, person_enc"
                        " FROM checkins ORDER BY day, sequence"
                    )
                )
            finally:
                await conn.close()

        backup = asyncio.run(rows())
        if on_hsm:
            days = [d31.isoformat(), d30.isoformat(), d20.isoformat()]
            from_backup = hsm_reads(settings, dsn_for(cluster, restored), days)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)'))

    # The backup holds every row of every day, the expired ones included.
    assert sorted({r["day"] for r in backup}) == [d31, d30, d20]
    assert len(backup) == len(visits)
    people = {v.person_id for v in visits}

    if on_hsm:
        # The backup holds the expired days' wrapped keys, live as they were then;
        # the HSM that wrapped them no longer has what opens them. The kept day's
        # key opens from the backup: the backup is a backup, not a shredder.
        assert from_backup[d20.isoformat()] == keystore._read("day", d20.isoformat())
        for day in (d31, d30):
            refused = from_backup[day.isoformat()]
            assert isinstance(refused, KeyError_) and not isinstance(refused, KeyDestroyed)
            assert "the HSM has no key" in str(refused)

    # The key store as it is now, opened afresh (nothing cached in memory).
    now_store = keystores.open_for(settings, db.SERVICE_ROLES["retention"])
    for visit, row in zip(visits, backup, strict=True):
        assert (visit.day, visit.sequence) == (row["day"], row["sequence"])
        aad = row_aad(row["venue_id"].bytes, row["device_id"].bytes, row["sequence"], row["day"])
        if row["day"] == d20:
            key = now_store.day_key(d20, create=False)
            assert key.decrypt(row["person_enc"], aad) == visit.person_id.bytes
            assert key.pseudonym(visit.person_id.bytes) == row["person_ref"]
            continue
        # Expired: the key is destroyed (a tombstone), its file gone, and it can
        # never be made again; without it neither the ciphertext nor the pseudonym
        # opens. Even reading the file around the tombstone finds nothing.
        with pytest.raises(KeyDestroyed):
            now_store.day_key(row["day"], create=False)
        with pytest.raises(KeyDestroyed):
            now_store.day_key(row["day"], create=True)
        if not on_hsm:
            assert not (settings.keystore_dir / "day" / row["day"].isoformat()).exists()
        with pytest.raises(KeyError_):
            now_store._read("day", row["day"].isoformat())
        # Linking: the pseudonym is HMAC(day key, person id); no other key in the
        # store (a kept day's, say) reproduces it for anyone.
        kept = now_store.day_key(d20, create=False)
        assert row["person_ref"] not in {kept.pseudonym(p.bytes) for p in people}
        with pytest.raises(InvalidTag):
            kept.decrypt(row["person_enc"], aad)

    now_store.close()

    # And the expired days are gone from the live database itself.
    assert db_conn("SELECT count(*) FROM checkins WHERE day IN ($1, $2)", d31, d30)[0][0] == 0
    assert db_conn("SELECT count(*) FROM day_keys WHERE destroy_time IS NOT NULL")[0][0] == 2
    # In the live database the wrapped copies are gone too (tombstones remain).
    wrapped = db_conn("SELECT name, wrapped FROM wrapped_keys WHERE kind = 'day' ORDER BY name")
    if on_hsm:
        assert [(r[0], r[1] is None) for r in wrapped] == [
            (d31.isoformat(), True),
            (d30.isoformat(), True),
            (d20.isoformat(), False),
        ]
    else:
        assert wrapped == []
