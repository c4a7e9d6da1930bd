"""CheckInService: enrollment, personal tokens, and the check-in hot path, one part
per subject on a shared base (base.py):

- streams.py: StreamScans, the device's check-in stream;
- door.py: CheckIn, SelfCheckIn, GetEntryDecision;
- enrollment.py: EnrollPerson, IssuePersonalToken.

The path of a scan is described in DESIGN.md ("The path of a scan") and in the
README; deciding a scan is scans.py, committing it commit.py.
"""

from __future__ import annotations

from services.checkin.door import DoorRpcs
from services.checkin.enrollment import EnrollmentRpcs
from services.checkin.streams import StreamRpcs


class CheckInService(StreamRpcs, DoorRpcs, EnrollmentRpcs):
    """The CheckIn server's servicer."""
