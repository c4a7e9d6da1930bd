"""How many SMS segments a text takes (3GPP TS 23.038 and 23.040).

A text that every character of which is in the GSM 7-bit default alphabet goes as
GSM-7: 160 septets in one message, 153 per segment when concatenated (the user
data header takes the rest), and each character of the extension table (^ { } [ ]
~ | \\ euro, form feed) costs two septets, an escape and itself, which a segment
never splits. Any other character, Khmer among them, sends the whole text as
UCS-2: 70 UTF-16 code units in one message, 67 per segment, a surrogate pair never
split. Operators bill, and phones reassemble, by segment.
"""

from __future__ import annotations

from dataclasses import dataclass

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

GSM7, UCS2 = "GSM-7", "UCS-2"
SINGLE = {GSM7: 160, UCS2: 70}
CONCATENATED = {GSM7: 153, UCS2: 67}


@dataclass(frozen=True)
class Size:
    encoding: str
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2)."""
    segments: int


def encoding(text: str) -> str:
    return GSM7 if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text) else UCS2


def _cost(char: str, kind: str) -> int:
    if kind == GSM7:
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def size(text: str) -> Size:
    """The encoding, length and segment count of `text` as an SMS."""
    kind = encoding(text)
    costs = [_cost(c, kind) for c in text]
    units = sum(costs)
    if units <= SINGLE[kind]:
        return Size(kind, units, 1 if text else 0)
    # Fill segments character by character: an escape pair or a surrogate pair
    # that does not fit moves whole to the next segment.
    segments, used = 1, 0
    for cost in costs:
        if used + cost > CONCATENATED[kind]:
            segments, used = segments + 1, 0
        used += cost
    return Size(kind, units, segments)
