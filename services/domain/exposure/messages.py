"""What a contact is told, in Khmer or English, within an SMS segment budget (the
outbox renders it: outbox.py).

Each message names the risk level, the venue, the date (Cambodia) and the advice,
never anything about the case. A message is sent as few SMS segments as it can be
(services/domain/text/sms.py): Khmer needs UCS-2 (67 code units a segment), and so does an
English message once the venue's name holds a Khmer character. Venue names are
free text of up to 200 characters, so a message that would exceed
STOPCOVID_SMS_MAX_SEGMENTS has its venue name shortened, a whole syllable at a time
(services/domain/text/khmer.py), ending in an ellipsis; everything else is always sent in
full. `check_budget` refuses, at start-up, a budget too small for the templates
themselves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from services.domain.exposure.risk import HIGH, LOW, MEDIUM, RAISED
from services.domain.text import khmer, sms

LANGUAGES = ("km", "en")
RISK_LEVELS = RAISED
"""The levels a message is written for: those a trace can give."""

_LEVELS = {
    "en": {HIGH: "HIGH", MEDIUM: "MEDIUM", LOW: "LOW"},
    "km": {HIGH: "ខ្ពស់", MEDIUM: "មធ្យម", LOW: "ទាប"},
}
_ADVICE = {
    "en": {
        HIGH: "Please stay at home, get tested and call 115 for advice.",
        MEDIUM: "Please get tested and watch for symptoms for 14 days.",
        LOW: "Please watch for symptoms for 14 days and get tested if you feel unwell.",
    },
    "km": {
        HIGH: "សូមស្នាក់នៅផ្ទះ ធ្វើតេស្ត និងទូរស័ព្ទទៅលេខ ១១៥ ដើម្បីទទួលការណែនាំ។",
        MEDIUM: "សូមធ្វើតេស្ត និងតាមដានរោគសញ្ញារយៈពេល ១៤ ថ្ងៃ។",
        LOW: "សូមតាមដានរោគសញ្ញារយៈពេល ១៤ ថ្ងៃ ហើយធ្វើតេស្តប្រសិនបើមិនស្រួលខ្លួន។",
    },
}
_SOME_VENUE = {"en": "a venue", "km": "ទីតាំងមួយ"}
_CUT = {sms.GSM7: "...", sms.UCS2: "\u2026"}
"""What ends a shortened venue name: an ellipsis character is not in GSM-7, and
would by itself make an English message UCS-2."""

DEFAULT_MAX_SEGMENTS = 4


def language_of(template: str) -> str:
    """The language a template is written in ("exposure-high-km-1" -> "km")."""
    parts = template.split("-")
    return "en" if len(parts) >= 3 and parts[2] == "en" else "km"


def _compose(lang: str, risk_level: str, venue: str, day: str) -> str:
    level = _LEVELS[lang][risk_level]
    advice = _ADVICE[lang][risk_level]
    if lang == "en":
        return (
            f"Stop COVID: you were at {venue} on {day} at the same time as a person who has "
            f"since tested positive for COVID-19. Your risk level: {level}. {advice}"
        )
    return (
        f"Stop COVID៖ អ្នកបានទៅ {venue} នៅថ្ងៃ {day} ក្នុងពេលតែមួយជាមួយអ្នកដែលបានធ្វើតេស្ត"
        f"វិជ្ជមានកូវីដ-១៩។ កម្រិតហានិភ័យរបស់អ្នក៖ {level}។ {advice}"
    )


def _fit(compose: Callable[[str], str], venue: str, max_segments: int) -> str:
    """compose(venue), with venue shortened to the most syllables that keep the
    message within `max_segments` (a binary search: more syllables never take
    fewer segments)."""
    whole = compose(venue)
    if sms.size(whole).segments <= max_segments:
        return whole
    parts = khmer.syllables(venue)

    def shortened(keep: int) -> str:
        head = "".join(parts[:keep]).rstrip()
        cut = _CUT[sms.encoding(compose(head))]
        return compose(head + cut)

    low, high = 0, len(parts) - 1  # `low` syllables always fit (checked at start-up)
    while low < high:
        middle = (low + high + 1) // 2
        if sms.size(shortened(middle)).segments <= max_segments:
            low = middle
        else:
            high = middle - 1
    return shortened(low)


def render(
    risk_level: str,
    venue_name: str,
    exposure_date: dt.date | None,
    language: str,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> str:
    """The message: risk level, venue, date (Cambodia), advice, in at most
    `max_segments` SMS segments. The case is never named or described: only that
    someone at the venue then has since tested positive."""
    lang = "en" if language == "en" else "km"
    day = exposure_date.isoformat() if exposure_date else ""
    venue = " ".join(venue_name.split()) or _SOME_VENUE[lang]
    return _fit(lambda v: _compose(lang, risk_level, v, day), venue, max_segments)


def check_budget(max_segments: int) -> None:
    """Refuse (SystemExit, at start-up) a segment budget some template cannot meet
    even with its venue name cut to nothing."""
    day = "2026-12-31"
    for lang in LANGUAGES:
        for level in RISK_LEVELS:
            # The shortest a message gets: its venue cut to nothing but the mark
            # (which, like every cut, follows the encoding of the rest).
            nothing = _CUT[sms.encoding(_compose(lang, level, "", day))]
            for venue in (_SOME_VENUE[lang], nothing):
                needed = sms.size(_compose(lang, level, venue, day)).segments
                if needed > max_segments:
                    raise SystemExit(
                        f"configuration error: STOPCOVID_SMS_MAX_SEGMENTS is {max_segments}, "
                        f"but the {lang} {level}-risk message needs {needed} segments "
                        "without its venue name"
                    )
