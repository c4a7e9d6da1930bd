"""The Ministry of Health's flow through the typed clients, end to end.

    report a case -> request access -> a different principal approves -> start a
    trace -> poll it -> list the contacts -> list the notifications queued

With `./dev up` running (its development certificates in .stopcovid/pki):

    ./dev python docs/examples/ministry_flow.py --phone +85512345678 --enroll \
        --codes-file .stopcovid/notifications.jsonl

`--enroll` first enrolls the number through the CheckIn service as the registrar,
so the example works on an empty system; leave it out for a person already
enrolled. Enrollment takes two steps: the server sends a 6-digit code to the
number, which the person tells the front-end. Here the code is typed in, or read
from the file the dev stack's file sender writes (`--codes-file
.stopcovid/notifications.jsonl`). `--identify` also asks for the contacts' person
ids, which needs the active grant and is written to the audit log. Exit status: 0 when the trace
succeeded, 1 otherwise. Synthetic data only.

It needs nothing but the stopcovid-client distribution: tests/test_client_distribution.py
runs it from an environment that holds that wheel and its dependencies alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
import uuid
from zoneinfo import ZoneInfo

from stopcovid.checkin.v1 import checkin_service_pb2 as checkin_pb
from stopcovid.client import CheckInClient, ClientConfig, ExposureClient
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

CAMBODIA = ZoneInfo("Asia/Phnom_Penh")
DONE = {pb.TRACE_STATE_SUCCEEDED, pb.TRACE_STATE_FAILED, pb.TRACE_STATE_CANCELLED}


def sent_code(codes_file: str | None, verification_id: str) -> str:
    """The enrollment code: from the file sender's JSON lines, or typed in."""
    if codes_file is None:
        return input("the 6-digit code sent to the number: ").strip()
    with open(codes_file, encoding="utf-8") as lines:
        for line in lines:
            message = json.loads(line)
            if message.get("notification_id") == verification_id:
                found = re.search(r"(?<![0-9])[0-9]{6}(?![0-9])", message["text"])
                if found:
                    return found.group()
    raise SystemExit(f"no code for {verification_id} in {codes_file}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--exposure", default="localhost:50053", help="Exposure server")
    parser.add_argument("--checkin", default="localhost:50051", help="CheckIn server")
    parser.add_argument("--pki-dir", default=".stopcovid/pki", help="certificates")
    parser.add_argument("--official", default="dev-health-official", help="the requester")
    parser.add_argument("--approver", default="dev-approver", help="a different principal")
    parser.add_argument("--registrar", default="dev-registrar", help="used with --enroll")
    parser.add_argument("--phone", required=True, help="the case's phone number (E.164)")
    parser.add_argument("--enroll", action="store_true", help="enroll the number first")
    parser.add_argument(
        "--codes-file", help="with --enroll: the file sender's output (else: type the code)"
    )
    parser.add_argument("--test-date", help="YYYY-MM-DD (default: today in Cambodia)")
    parser.add_argument("--identify", action="store_true", help="decrypt contacts' ids")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    args = parser.parse_args(argv)

    def config(target: str, principal: str) -> ClientConfig:
        return ClientConfig.from_pki_dir(target, args.pki_dir, principal)

    if args.enroll:
        with CheckInClient(config(args.checkin, args.registrar)) as checkin:
            request = checkin_pb.EnrollPersonRequest(
                phone_number=args.phone, consent_given=True, consent_text_version="example-1"
            )
            answer = checkin.rpc.EnrollPerson(request)
            if answer.state == checkin_pb.ENROLLMENT_STATE_CODE_SENT:
                # The second step: the code the person received.
                request.verification_id = answer.verification_id
                request.verification_code = sent_code(args.codes_file, answer.verification_id)
                answer = checkin.rpc.EnrollPerson(request)
            print("enrolled" if answer.newly_enrolled else "enrolled already")

    test_date = args.test_date or dt.datetime.now(CAMBODIA).date().isoformat()
    with (
        ExposureClient(config(args.exposure, args.official)) as official,
        ExposureClient(config(args.exposure, args.approver)) as approver,
    ):
        # 1. The case. A request_id makes the call safe to retry.
        case = official.rpc.ReportCase(
            pb.ReportCaseRequest(
                person=common_pb2.PersonSelector(phone_number=args.phone),
                case=pb.Case(test_date=test_date, external_reference="EXAMPLE-LAB-1"),
                request_id=str(uuid.uuid4()),
            )
        ).case
        window = case.infectious_window
        print(f"case {case.case_id}: infectious from {window.start_time.ToJsonString()}")

        # 2. Access, asked by the health official ...
        asked = official.rpc.CreateAccessRequest(
            pb.CreateAccessRequestRequest(
                access_request=pb.AccessRequest(
                    case_id=case.case_id,
                    outbreak_reference="EXAMPLE-OUTBREAK-1",
                    justification="Example: contacts of a confirmed case must be warned.",
                ),
                request_id=str(uuid.uuid4()),
            )
        ).access_request
        print(f"access request {asked.access_request_id}: pending")

        # 3. ... and approved by someone else (the same principal is refused).
        grant = approver.rpc.ApproveAccessRequest(
            pb.ApproveAccessRequestRequest(
                access_request_id=asked.access_request_id, comment="outbreak confirmed"
            )
        ).access_request.grant
        print(f"grant {grant.grant_id}: until {grant.expire_time.ToJsonString()}")

        # 4. The trace runs as a worker job; poll it.
        trace = official.rpc.StartTrace(
            pb.StartTraceRequest(
                case_id=case.case_id, grant_id=grant.grant_id, request_id=str(uuid.uuid4())
            )
        ).trace
        deadline = time.monotonic() + args.timeout
        while trace.state not in DONE and time.monotonic() < deadline:
            time.sleep(0.2)
            trace = official.rpc.GetTrace(pb.GetTraceRequest(trace_id=trace.trace_id)).trace
        state = pb.TraceState.Name(trace.state)
        print(f"trace {trace.trace_id}: {state}, {trace.visits_found} visits")
        if trace.state != pb.TRACE_STATE_SUCCEEDED:
            print(f"trace did not succeed: {trace.error_message or 'timed out'}", file=sys.stderr)
            return 1
        for count in trace.level_counts:
            print(f"  {common_pb2.RiskLevel.Name(count.risk_level)}: {count.people} people")

        # 5. The contacts, highest risk first, page by page.
        contacts: list[pb.TraceContact] = []
        token = ""
        while True:
            page = official.rpc.ListTraceContacts(
                pb.ListTraceContactsRequest(
                    trace_id=trace.trace_id,
                    page_size=100,
                    page_token=token,
                    include_person_ids=args.identify,
                )
            )
            contacts.extend(page.trace_contacts)
            token = page.next_page_token
            if not token:
                break
        print(f"contacts: {len(contacts)} overlaps")
        for contact in contacts:
            level = common_pb2.RiskLevel.Name(contact.risk_level)
            minutes = contact.overlap.ToTimedelta().total_seconds() / 60
            who = f" person {contact.person_id}" if contact.person_id else ""
            print(f"  {contact.contact_ref} {level} {minutes:.0f} min ({contact.rule}){who}")

        # 6. The notifications the trace queued (never a phone number).
        notes = official.rpc.ListNotifications(
            pb.ListNotificationsRequest(trace_id=trace.trace_id)
        ).notifications
        print(f"notifications: {len(notes)}")
        for note in notes:
            print(f"  {note.contact_ref} {pb.NotificationState.Name(note.state)} {note.template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
