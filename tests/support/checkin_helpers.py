"""Shared pieces of the check-in tests: venues, devices, people, and a bidi stream
driven one message at a time from a blocking test."""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import stopcovid.client as clients
from cryptography import x509
from google.protobuf import timestamp_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.common.v1 import common_pb2
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.domain.people import verification
from services.kernel.config import Settings
from services.kernel.pki import write_issued
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import wait_for

ENTRY = common_pb2.SCAN_DIRECTION_ENTRY
EXIT = common_pb2.SCAN_DIRECTION_EXIT


def ts(at: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def config(servers: Servers, service: str, principal: str) -> ClientConfig:
    return replace(
        ClientConfig.from_pki_dir(servers.target(service), servers.pki.dir, principal),
        retry=RetryPolicy(max_attempts=1),
    )


def org_principal(servers: Servers, name: str, role: str, org: str | None) -> str:
    """A certificate for `name` in `role` acting for `org` (none: None); its file stem."""
    stem = f"tenancy-{name}"
    if not (servers.pki.dir / f"{stem}.pem").exists():
        servers.pki.write(stem, servers.pki.issue(name, role, org))
    return stem


def create_venue(servers: Servers, name: str = "Central Market", indoor: bool = True) -> str:
    with clients.VenueClient(config(servers, "venue", "dev-venue-operator")) as venues:
        venue = venues.rpc.CreateVenue(
            vpb.CreateVenueRequest(
                venue=vpb.Venue(
                    display_name=name,
                    setting=vpb.VENUE_SETTING_INDOOR if indoor else vpb.VENUE_SETTING_OUTDOOR,
                    region_code="KH-12",
                )
            )
        ).venue
    return venue.venue_id


def add_device(servers: Servers, db_conn: Query, venue_id: str) -> str:
    """A device row and its certificate, written the way RegisterDevice does (so these
    tests do not depend on the Venue service)."""
    device_id = uuid.uuid4()
    issued = servers.pki.issue(str(device_id), "ROLE_DEVICE")
    write_issued(servers.pki.dir, str(device_id), issued)
    db_conn(
        "INSERT INTO devices (device_id, venue_id, display_name, certificate_serial,"
        " certificate_expire_time, created_by, owner_organization)"
        " SELECT $1, $2, 'Door', $3, now() + interval '1 year', 'test', owner_organization"
        " FROM venues WHERE venue_id = $2",
        device_id,
        uuid.UUID(venue_id),
        f"{x509.load_pem_x509_certificate(issued.certificate_pem).serial_number:x}",
    )
    return str(device_id)


def enroll_request(phone: str, **fields: Any) -> pb.EnrollPersonRequest:
    given: dict[str, Any] = {"consent_given": True, "consent_text_version": "2026-11-km-1"}
    return pb.EnrollPersonRequest(phone_number=phone, **{**given, **fields})


def sent_code(settings: Settings, answer: pb.EnrollPersonResponse) -> str:
    """The code a CODE_SENT answer sent, read from the file the server's (file)
    sender wrote it to, as the person would read it on their phone."""
    assert answer.state == pb.ENROLLMENT_STATE_CODE_SENT, answer
    code = verification.code_in_file(settings.notify_file, answer.verification_id)
    assert code is not None, "the server sent no code for this verification id"
    return code


def with_code(
    request: pb.EnrollPersonRequest, answer: pb.EnrollPersonResponse, code: str
) -> pb.EnrollPersonRequest:
    return verification.second_step(request, answer.verification_id, code)


def enroll_as(
    checkin: clients.CheckInClient, settings: Settings, request: pb.EnrollPersonRequest
) -> pb.EnrollPersonResponse:
    """EnrollPerson in its two steps through a real server: ask, read the code the
    server sent, answer with it (one step for a number the caller enrolled)."""
    answer: pb.EnrollPersonResponse = checkin.rpc.EnrollPerson(request)
    if answer.state == pb.ENROLLMENT_STATE_ENROLLED:
        return answer
    code = sent_code(settings, answer)
    enrolled: pb.EnrollPersonResponse = checkin.rpc.EnrollPerson(with_code(request, answer, code))
    return enrolled


async def enroll_as_async(
    checkin: clients.AsyncCheckInClient, settings: Settings, request: pb.EnrollPersonRequest
) -> pb.EnrollPersonResponse:
    """enroll_as, on an async client."""
    return await verification.enroll_reading_codes(
        checkin.rpc.EnrollPerson, request, settings.notify_file
    )


def enroll(
    servers: Servers, phone: str, principal: str = "dev-registrar"
) -> pb.EnrollPersonResponse:
    with clients.CheckInClient(config(servers, "checkin", principal)) as checkin:
        return enroll_as(checkin, servers.settings, enroll_request(phone))


def enroll_high_risk(servers: Servers, db_conn: Query, phone: str) -> pb.EnrollPersonResponse:
    """A person at the HIGH risk level, once the CheckIn server knows it: each scan of
    theirs is DENIED with a decision id, which makes acks big."""
    person = enroll(servers, phone)
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time)"
        " VALUES ($1, 'high', now() + interval '1 day')",
        uuid.UUID(person.person_id),
    )
    checkin = servers.servicers["checkin"]
    wait_for(lambda: bool(checkin.caches.high_risk), what="the HIGH level reached the server")
    return person


def denied_door(servers: Servers, db_conn: Query, phone: str) -> tuple[str, str]:
    """A device at a new venue and the token of a person at the HIGH risk level, whose
    every scan there is DENIED with a decision id (acks as big as they come): the
    device's id and the token."""
    device = add_device(servers, db_conn, create_venue(servers))
    return device, enroll_high_risk(servers, db_conn, phone).personal_token.token


def erasures_applied(servers: Servers, db_conn: Query, device_id: str) -> None:
    """Wait until the CheckIn server has applied every erasure committed so far.

    The server hears of erasures by NOTIFY. Postgres delivers notifications in commit
    order, and the server applies each delivery's erasures at once, so one committed
    now marks the point: a probe person is enrolled and erased, and once the door
    (GetEntryDecision as `device_id`) refuses the probe, every earlier erasure is in
    the server's cache, while the tokens of those people were never looked at."""
    probe = enroll(servers, f"+85597{secrets.randbelow(10**7):07d}")
    db_conn("INSERT INTO erased_people (person_id) VALUES ($1)", uuid.UUID(probe.person_id))
    request = pb.GetEntryDecisionRequest(personal_token=probe.personal_token.token)
    with clients.CheckInClient(config(servers, "checkin", device_id)) as door:
        wait_for(
            lambda: (
                door.rpc.GetEntryDecision(request).reject_reason
                == pb.SCAN_REJECT_REASON_PERSON_NOT_ENROLLED
            ),
            what="the CheckIn server to apply the erasures it was notified of",
        )


def scan(
    sequence: int,
    token: str,
    at: dt.datetime | None = None,
    direction: common_pb2.ScanDirection.ValueType = ENTRY,
) -> pb.Scan:
    return pb.Scan(
        sequence=sequence, personal_token=token, scan_time=ts(at or now()), direction=direction
    )


def batch(batch_id: str, *scans: pb.Scan) -> pb.StreamScansRequest:
    return pb.StreamScansRequest(batch=pb.ScanBatch(batch_id=batch_id, scans=list(scans)))


_CLOSE = object()


@dataclass
class DeviceStream:
    """A StreamScans call: `send()` a batch, `recv()` the next server message."""

    client: clients.CheckInClient
    outgoing: queue.Queue[Any] = field(default_factory=queue.Queue)
    incoming: queue.Queue[Any] = field(default_factory=queue.Queue)
    settings: pb.StreamSettings | None = None

    def _requests(self) -> Iterator[pb.StreamScansRequest]:
        while True:
            item = self.outgoing.get()
            if item is _CLOSE:
                return
            yield item

    def start(self) -> DeviceStream:
        call = self.client.rpc.StreamScans(self._requests(), timeout=60)

        def pump() -> None:
            try:
                for message in call:
                    self.incoming.put(message)
                self.incoming.put(None)
            except Exception as exc:  # the stream's end status, raised as our error
                self.incoming.put(exc)

        threading.Thread(target=pump, daemon=True).start()
        first = self.recv()
        assert first.WhichOneof("kind") == "settings", first
        self.settings = first.settings
        return self

    def send(self, request: pb.StreamScansRequest) -> None:
        self.outgoing.put(request)

    def recv(self, timeout: float = 15) -> pb.StreamScansResponse:
        item = self.incoming.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        assert item is not None, "the stream ended"
        return item  # type: ignore[no-any-return]

    def ack(self, timeout: float = 15) -> pb.ScanBatchAck:
        while True:
            message = self.recv(timeout)
            if message.WhichOneof("kind") == "ack":
                return message.ack

    def end(self) -> BaseException | None:
        """Half-close and return how the stream ended (None: OK)."""
        self.outgoing.put(_CLOSE)
        while True:
            item = self.incoming.get(timeout=15)
            if item is None:
                return None
            if isinstance(item, Exception):
                return item

    def ended_with(self, timeout: float = 15) -> BaseException | None:
        """Wait for the server to end the stream; return its error (None: OK)."""
        while True:
            item = self.incoming.get(timeout=timeout)
            if item is None:
                return None
            if isinstance(item, Exception):
                return item


def open_stream(servers: Servers, device_id: str) -> DeviceStream:
    client = clients.CheckInClient(config(servers, "checkin", device_id))
    return DeviceStream(client).start()


def connections_to(port: int) -> set[tuple[str, str]]:
    """The established TCP connections whose server end is `port` on this machine, as
    (local, remote) address pairs: a new connection shows as a new pair."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                local, remote, state = line.split()[1:4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.add((local, remote))
    return found
