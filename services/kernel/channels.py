"""The NOTIFY channels between processes, each named once.

Triggers in the migrations send on them (their names are SQL there, and
tests/test_contracts.py checks the two agree); the processes LISTEN by these
constants. A payload is an opaque id or nothing, never personal data.
"""

from __future__ import annotations

RISK = "stopcovid_risk"
"""A risk_status row changed (payload: the person id). CheckIn servers re-read it."""

ERASED = "stopcovid_erased"
"""A person was erased or un-erased (payload: the person id). CheckIn servers."""

DEVICE = "stopcovid_device"
"""A device changed, e.g. was revoked (payload: the device id). CheckIn servers."""

VENUE = "stopcovid_venue"
"""A venue changed, e.g. was suspended (payload: the venue id). CheckIn servers."""

STREAM = "stopcovid_stream"
"""A device took a new writer epoch (payload: the device id). CheckIn servers end
the device's older stream."""

INBOX = "stopcovid_inbox"
"""Scans were committed to the inbox (no payload). Ingest workers wake."""

TRACE = "stopcovid_trace"
"""A trace was queued (no payload). Trace workers wake."""

OUTBOX = "stopcovid_notify"
"""Notifications were queued (no payload). Outbox workers wake."""

REVOCATION = "stopcovid_revocation"
"""A certificate was revoked (payload: its serial in hex). Every server re-reads it
and ends the calls open under it (services/kernel/revocation.py)."""

CHECKIN_CACHES = (RISK, ERASED, DEVICE, VENUE, STREAM)
"""What a CheckIn server listens to."""

WORKER_POOL = (INBOX, TRACE, OUTBOX)
"""What a worker process listens to (one connection for all three)."""

ALL = (RISK, ERASED, DEVICE, VENUE, STREAM, INBOX, TRACE, OUTBOX, REVOCATION)
