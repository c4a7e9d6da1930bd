"""The PKCS#11 key store on a SoftHSM2 token and a real database: every host (here,
stores with their own HSM session and database connection) reaches the same keys,
no key the HSM holds can be read out of it, racing hosts agree on one key, and a
destroyed key stays destroyed everywhere; the servers run on it, each as its own
database role. Synthetic data only."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import asyncpg
import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import AttributeSensitive, UserAlreadyLoggedIn
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb

from services.domain.checkins.ingest import days_to_prepare
from services.kernel import db, keystores
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyError_, KeyStore, row_aad
from tests.support import softhsm as softhsm_support
from tests.support.checkin_helpers import (
    add_device,
    batch,
    create_venue,
    enroll,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.exposure_helpers import by_phone, report_case
from tests.support.fleet import stop_gracefully, worker_process
from tests.support.servers import Pki, running_servers
from tests.support.softhsm import SoftHsm
from tests.support.waits import wait_for

DAY = dt.date(2026, 11, 3)


@pytest.fixture
def hosts(settings: Settings, softhsm: SoftHsm) -> Iterator[tuple[KeyStore, KeyStore]]:
    """Two hosts' key stores: a CheckIn server's and a worker's."""
    own = softhsm.settings(settings)
    a = keystores.open_for(own, db.SERVICE_ROLES["checkin"])
    b = keystores.open_for(own, db.SERVICE_ROLES["worker"])
    yield a, b
    a.close()
    b.close()


def hsm_keys(softhsm: SoftHsm, label_part: str) -> list[tuple[str, bool]]:
    """(label, whether the token would hand out its value) of the token's secret
    keys whose label contains `label_part`."""
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=softhsm.token)
    found = []
    try:
        session = token.open(user_pin=softhsm.pin)
    except UserAlreadyLoggedIn:  # a store of this process is open: its login holds
        session = token.open()
    with session:
        for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = key[Attribute.LABEL]
            if label_part not in label:
                continue
            try:
                key[Attribute.VALUE]
                readable = True
            except AttributeSensitive:
                readable = False
            found.append((label, readable))
    return sorted(found)


def test_every_host_reaches_the_same_keys_and_no_hsm_key_leaves_the_hsm(
    hosts: tuple[KeyStore, KeyStore], softhsm: SoftHsm, settings: Settings, db_conn: Query
) -> None:
    a, b = hosts
    a.ensure_all()
    day = a.day_key(DAY)
    person, aad = uuid.uuid4().bytes, b"row"
    assert b.day_key(DAY).decrypt(day.encrypt(person, aad), aad) == person
    assert b.token_keys() == a.token_keys()
    assert b.blind_index_key() == a.blind_index_key()
    # A rotation (`stopcovid keys rotate-token`, as the migrator) is seen by every
    # host; a server's role may not rotate.
    with pytest.raises(KeyError_, match="refused a statement"):
        a.rotate_token_key()
    operator = keystores.open_for(softhsm.settings(settings), db.MIGRATOR)
    try:
        operator.rotate_token_key()
    finally:
        operator.close()
    current, accepted = b.token_keys()
    # (The refused rotation had stored its new key, t2, before the pointer; it is
    # accepted but never current, as with the file store.)
    assert (current, sorted(accepted)) == ("t3", ["t1", "t2", "t3"])

    # The database holds wrapped keys only: no key's bytes appear in any row.
    rows = db_conn("SELECT kind, name, wrapped FROM wrapped_keys")
    plain = [a._read(r[0], r[1]) for r in rows]
    assert len(plain) == 8  # day, t1-t3, people p1, blind-index, venue v1, page tokens
    for row in rows:
        assert not any(key in bytes(row[2]) for key in plain)
    # The HSM holds the master key and the day's own key, neither readable.
    namespace = settings.database_name
    assert hsm_keys(softhsm, f"{namespace}/") == [
        (f"{namespace}/day/{DAY.isoformat()}", False),
        (f"{namespace}/master", False),
    ]


def test_hosts_racing_to_make_a_day_key_agree_on_one(
    hosts: tuple[KeyStore, KeyStore], softhsm: SoftHsm, settings: Settings
) -> None:
    a, b = hosts
    for n in range(1, 6):
        day = DAY + dt.timedelta(days=10 * n)
        with ThreadPoolExecutor(8) as pool:
            made = list(pool.map(lambda i, day=day: (a, b)[i % 2].day_key(day), range(8)))
        probe, aad = b"p" * 16, b"aad"
        sealed = made[0].encrypt(probe, aad)
        assert all(key.decrypt(sealed, aad) == probe for key in made)
        # The losers' HSM keys were destroyed: one wrapping key for the day is left.
        label = f"{settings.database_name}/day/{day.isoformat()}"
        assert hsm_keys(softhsm, label) == [(label, False)]


def test_a_destroyed_key_is_destroyed_for_every_host(
    hosts: tuple[KeyStore, KeyStore], softhsm: SoftHsm, settings: Settings, db_conn: Query
) -> None:
    a, b = hosts
    day = DAY + dt.timedelta(days=2)
    case = uuid.uuid4()
    a.day_key(DAY)  # kept
    a.day_key(day)
    a.case_key(case, create=True)
    assert b.destroy_day_key(day) is True
    assert b.destroy_case_key(case) is True
    # Again (a retried expiry run): nothing left to destroy, no error.
    assert b.destroy_day_key(day) is False
    label = f"{settings.database_name}/day/{day.isoformat()}"
    assert hsm_keys(softhsm, label) == []
    # (The same look sees a key that is there: the kept day's.)
    assert hsm_keys(softhsm, f"{settings.database_name}/") == [
        (f"{settings.database_name}/day/{DAY.isoformat()}", False)
    ]
    assert hsm_keys(softhsm, f"{settings.database_name}/case/{case}") == []
    fresh = keystores.open_for(softhsm.settings(settings), db.SERVICE_ROLES["checkin"])
    try:
        with pytest.raises(KeyDestroyed):
            fresh.day_key(day, create=True)
        with pytest.raises(KeyDestroyed):
            fresh.case_key(case, create=True)
        assert not fresh.has_day_key(day)
    finally:
        fresh.close()
    # A tombstone is final, even for the owner of the table.
    with pytest.raises(asyncpg.IntegrityConstraintViolationError):
        db_conn(
            "UPDATE wrapped_keys SET destroy_time = NULL, wrapped = '\\x00'::bytea"
            " WHERE kind = 'day' AND name = $1",
            day.isoformat(),
        )


def test_a_worker_process_makes_the_days_ahead_on_the_hsm_store(
    settings: Settings, softhsm: SoftHsm, db_conn: Query, tmp_path: Path
) -> None:
    """The worker pool (trio, trio-asyncio: a process of its own) makes the day keys
    ahead in the HSM store and registers them, then stops cleanly."""
    wanted = days_to_prepare(dt.datetime.now(dt.UTC).date(), settings.max_scan_age_s)
    env = {
        "STOPCOVID_KEYSTORE": "pkcs11",
        "STOPCOVID_PKCS11_MODULE": str(softhsm.module),
        "STOPCOVID_PKCS11_TOKEN": softhsm.token,
    }

    def made() -> list[dt.date]:
        rows = db_conn(
            "SELECT w.name FROM wrapped_keys w JOIN day_keys d ON d.key_id = 'day-' || w.name"
            " WHERE w.kind = 'day' AND w.destroy_time IS NULL ORDER BY w.name"
        )
        return [dt.date.fromisoformat(r[0]) for r in rows]

    with worker_process(settings, tmp_path / "worker.log", **env) as proc:
        wait_for(lambda: made() == wanted, what="the worker to make the days ahead")
        assert stop_gracefully(proc) == 0
    label = f"{settings.database_name}/day/{wanted[-1].isoformat()}"
    assert hsm_keys(softhsm, label) == [(label, False)]


def test_a_database_it_cannot_reach_is_a_missing_key_not_a_hang(
    settings: Settings, softhsm: SoftHsm
) -> None:
    elsewhere = replace(softhsm.settings(settings), database_name="stopcovid_nonexistent")
    store = keystores.open_for(elsewhere, db.SERVICE_ROLES["checkin"])
    try:
        with pytest.raises(KeyError_, match=r"is unavailable \(InvalidCatalogNameError\)"):
            store.day_key(DAY)
    finally:
        store.close()


def test_the_backend_is_a_setting_with_plain_errors(settings: Settings) -> None:
    with pytest.raises(SystemExit, match="STOPCOVID_KEYSTORE must be one of file, pkcs11"):
        replace(settings, keystore_backend="kms")
    missing = replace(settings, keystore_backend="pkcs11", pkcs11_module=None)
    with pytest.raises(SystemExit, match="STOPCOVID_PKCS11_MODULE"):
        keystores.open_for(missing, db.SERVICE_ROLES["checkin"])


def test_the_servers_run_on_the_hsm_store_each_as_its_own_role(
    settings: Settings, softhsm: SoftHsm, pki: Pki, db_conn: Query
) -> None:
    """The four servers on the PKCS#11 store: the CheckIn server makes its token keys
    and the day's key under its own role, seals a scan with it, and another host
    (the Exposure server's role) opens the stored row; the Exposure server keeps
    its case keys there, and the page-token key is the store's."""
    own = softhsm.settings(settings)
    with running_servers(own, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        person = enroll(servers, "+85512000199")
        stream = open_stream(servers, device)
        stream.send(batch("b1", scan(1, person.personal_token.token)))
        assert [r.outcome for r in stream.ack().results] == [cpb.SCAN_OUTCOME_ADMITTED]
        assert stream.end() is None
        # The Exposure server seals a case under a case key of this store too (a
        # key of its own in the HSM), not of a file store beside it.
        case = report_case(servers, by_phone("+85512000199"))
    (row,) = db_conn(
        "SELECT day, venue_id, device_id, sequence, person_enc FROM checkins"
        " UNION ALL SELECT day, venue_id, device_id, sequence, person_enc FROM scan_inbox"
    )
    kinds = {r[0] for r in db_conn("SELECT DISTINCT kind FROM wrapped_keys")}
    assert {"day", "token", "people", "server"} <= kinds
    cases = db_conn("SELECT name FROM wrapped_keys WHERE kind = 'case'")
    assert [r["name"] for r in cases] == [case.case_id]
    other = keystores.open_for(own, db.SERVICE_ROLES["exposure"])
    try:
        key = other.day_key(row["day"], create=False)
    finally:
        other.close()
    aad = row_aad(row["venue_id"].bytes, row["device_id"].bytes, row["sequence"], row["day"])
    assert key.decrypt(row["person_enc"], aad) == uuid.UUID(person.person_id).bytes


def test_a_missing_softhsm_is_said_plainly_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"need SoftHSM2: .*apt-get install softhsm2"):
        softhsm_support.unavailable("its PKCS#11 module is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the HSM tests"):
        softhsm_support.unavailable("its PKCS#11 module is not installed")
