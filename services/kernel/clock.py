"""Time as the platform shows it: calendar dates are Cambodia's.

Asia/Phnom_Penh is UTC+07:00 all year (no daylight saving time), so a fixed
offset and the zone give the same dates; the zone is used everywhere so that one
definition serves every process. Instants are stored and compared in UTC; only
calendar dates (a case's infectious window, the dates in an export) are local.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

CAMBODIA = ZoneInfo("Asia/Phnom_Penh")


def local_midnight(day: dt.date) -> dt.datetime:
    """00:00 of `day` in Cambodia, as an aware datetime."""
    return dt.datetime.combine(day, dt.time(0), CAMBODIA)


def local_date(at: dt.datetime) -> dt.date:
    """The Cambodian calendar date of an instant."""
    return at.astimezone(CAMBODIA).date()
