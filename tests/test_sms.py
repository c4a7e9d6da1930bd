"""SMS segments: GSM-7 and UCS-2 counted as operators count them, and every
notification, in Khmer and English, within the configured budget whatever the
venue's name."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from services.domain.exposure import messages
from services.domain.text import khmer, sms
from services.kernel.config import Settings
from tests.support.servers import process_env

DAY = dt.date(2026, 11, 20)
LONGEST = 200
"""A venue's display_name is 1 to 200 characters (VenueService)."""


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", sms.GSM7, 0, 0),
        ("a" * 160, sms.GSM7, 160, 1),
        ("a" * 161, sms.GSM7, 161, 2),
        ("a" * 306, sms.GSM7, 306, 2),
        ("a" * 307, sms.GSM7, 307, 3),
        ("{" * 80, sms.GSM7, 160, 1),  # the extension table counts double
        ("€" * 81, sms.GSM7, 162, 2),
        # An escape pair never straddles two segments: 152 + 2 does not fit in 153.
        ("a" * 152 + "{" + "a" * 152, sms.GSM7, 306, 3),
        ("Café à Phnom Penh", sms.GSM7, 17, 1),  # é and à are in the basic alphabet
        ("Phở", sms.UCS2, 3, 1),  # ở is not
        ("ក" * 70, sms.UCS2, 70, 1),
        ("ក" * 71, sms.UCS2, 71, 2),
        ("ក" * 134, sms.UCS2, 134, 2),
        ("ក" * 135, sms.UCS2, 135, 3),
        # A surrogate pair is two units and is never split either.
        ("ក" * 66 + "\U0001f600" + "ក" * 66, sms.UCS2, 134, 3),
        ("a" * 159 + "ក", sms.UCS2, 160, 3),  # one Khmer letter makes it all UCS-2
    ],
)
def test_segments_are_counted_as_operators_count_them(
    text: str, encoding: str, units: int, segments: int
) -> None:
    assert sms.size(text) == sms.Size(encoding, units, segments)


VENUES = {
    "khmer": ("ផ្សារធំថ្មី" * 20)[:LONGEST],
    "khmer stacks": ("ស្ត្រី" * 40)[:LONGEST],
    "gsm extension": ("{[~]}|^€" * 25)[:LONGEST],
    "ascii": ("Phnom Penh Night Market " * 9)[:LONGEST],
    "vietnamese": ("Phở Hà Nội " * 19)[:LONGEST],
    "emoji": "\U0001f600" * LONGEST,
}


PREFIX = {"en": "Stop COVID: you were at ", "km": "Stop COVID៖ អ្នកបានទៅ "}
SUFFIX = {"en": f" on {DAY}", "km": f" នៅថ្ងៃ {DAY}"}


@pytest.mark.parametrize("budget", [3, messages.DEFAULT_MAX_SEGMENTS, 6])
@pytest.mark.parametrize("venue", list(VENUES))
@pytest.mark.parametrize("level", messages.RISK_LEVELS)
@pytest.mark.parametrize("language", messages.LANGUAGES)
def test_every_message_fits_the_budget_with_the_longest_venue_names(
    language: str, level: str, venue: str, budget: int
) -> None:
    name = VENUES[venue]
    text = messages.render(level, name, DAY, language, budget)
    assert sms.size(text).segments <= budget
    # Everything but the venue's name is sent whole.
    assert messages._ADVICE[language][level] in text
    assert messages._LEVELS[language][level] in text
    assert DAY.isoformat() in text
    shown = text.removeprefix(PREFIX[language]).split(SUFFIX[language])[0]
    name = " ".join(name.split())
    if shown != name:  # shortened: a prefix of whole syllables, then an ellipsis
        head = shown.removesuffix("...").removesuffix("\u2026")
        assert head != shown and name.startswith(head)
        assert "".join(khmer.syllables(name)[: len(khmer.syllables(head))]) == head
        assert not head.endswith(khmer.COENG)


def test_short_names_are_sent_whole_and_english_stays_gsm_when_it_can() -> None:
    english = messages.render("high", "Central Market", DAY, "en")
    assert "Central Market" in english and sms.size(english) == sms.Size(sms.GSM7, 205, 2)
    khmer_text = messages.render("low", "ផ្សារធំថ្មី", DAY, "km")
    assert "ផ្សារធំថ្មី" in khmer_text and sms.size(khmer_text).encoding == sms.UCS2
    cut = messages.render("medium", "Phnom Penh Night Market " * 8, DAY, "en", 2)
    assert cut.count("...") == 1 and sms.size(cut) == sms.Size(sms.GSM7, sms.size(cut).units, 2)


def test_a_budget_the_templates_cannot_meet_stops_the_workers(settings: Settings) -> None:
    messages.check_budget(3)  # Khmer needs three segments without a venue name
    with pytest.raises(SystemExit, match="STOPCOVID_SMS_MAX_SEGMENTS is 2"):
        messages.check_budget(2)
    # The worker process itself (not imported here: trio-asyncio in this process
    # would upset the in-process asyncio servers of the other tests).
    started = subprocess.run(
        [sys.executable, "-m", "workers"],
        env=process_env(
            settings, STOPCOVID_SMS_MAX_SEGMENTS="2", STOPCOVID_WORKERS_METRICS_PORT="0"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode != 0
    assert "STOPCOVID_SMS_MAX_SEGMENTS is 2" in started.stderr + started.stdout


def test_the_budget_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOPCOVID_SMS_MAX_SEGMENTS", "6")
    assert Settings.from_env().sms_max_segments == 6
    monkeypatch.delenv("STOPCOVID_SMS_MAX_SEGMENTS")
    assert Settings.from_env().sms_max_segments == messages.DEFAULT_MAX_SEGMENTS
