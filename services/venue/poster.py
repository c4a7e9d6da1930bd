"""Printable venue posters: the venue's name, its signed QR code, one instruction.

Pure functions (text in, bytes out, no I/O), so the service can run them in a
worker thread (a 300 dpi raster takes tens of milliseconds of CPU, too long to
hold the event loop) and tests can call them directly.

Both formats share one layout on an A4 page in 300 dpi pixels (2480 x 3508), so
the SVG prints like the PNG. The QR code is large (about 15 cm) and keeps its
4-module quiet zone, because phone cameras at arm's length and in poor light are
what it must survive; error correction Q tolerates a quarter of the code being
smudged, torn or covered by tape.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import segno
from PIL import Image, ImageDraw, ImageFont

PAGE_WIDTH, PAGE_HEIGHT = 2480, 3508
"""A4 (210 x 297 mm) at 300 dpi."""
DPI = 300
MARGIN = 200
QR_BORDER = 4
"""Quiet zone in modules; the QR standard asks for 4."""
QR_TARGET_PX = 1800
"""The QR code with its quiet zone is at most this wide (about 15 cm)."""
QR_TOP = 1000
TITLE_BAND = (250, 900)
"""The title's lines are centred vertically between these y coordinates."""
TITLE_SIZES = (140, 120, 100, 84, 70)
"""Title font sizes tried in turn until the name fits in TITLE_MAX_LINES lines."""
TITLE_MAX_LINES = 3
TITLE_LAST_RESORT_LINES = 4
"""At the smallest size, a name may take one more line before it is cut short."""
INSTRUCTION = "Scan to check in"
INSTRUCTION_SIZE = 110
LINE_SPACING = 1.2
FONT_FAMILY = "DejaVu Sans, Arial, Helvetica, sans-serif"
ELLIPSIS = "\u2026"

# Characters XML 1.0 cannot carry at all, not even escaped. A proto string is
# valid UTF-8 but may still hold U+FFFE, U+FFFF or C0 controls.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font, so rendering needs no system fonts. A new
    object per call: FreeType faces are not safe to share between threads."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType
        raise RuntimeError("Pillow lacks FreeType support; posters need scalable fonts")
    return font


def qr_code(payload: str) -> segno.QRCode:
    """The QR symbol of a venue payload (never a Micro QR: phones may not read those)."""
    return segno.make(payload, error="q", micro=False)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break `text` into lines no wider than `width`: at spaces where possible, inside
    a word only when the word alone is too wide."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines


def _cut(line: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`line` shortened to end in an ellipsis and fit `width`."""
    while line and font.getlength(line + ELLIPSIS) > width:
        line = line[:-1]
    return line.rstrip() + ELLIPSIS


@dataclass(frozen=True)
class TextLine:
    text: str
    size: int
    baseline: int
    """y of the baseline; the line is centred on the page horizontally."""


@dataclass(frozen=True)
class Layout:
    title: list[TextLine]
    instruction: TextLine
    qr: segno.QRCode
    qr_x: int
    qr_y: int
    module_px: int

    @property
    def qr_px(self) -> int:
        width, _ = self.qr.symbol_size(scale=1, border=QR_BORDER)
        return int(width) * self.module_px


def layout(title: str, payload: str) -> Layout:
    """Where everything goes on the page, in 300 dpi pixels."""
    width = PAGE_WIDTH - 2 * MARGIN
    cleaned = " ".join(title.split())
    size, lines = TITLE_SIZES[-1], [cleaned]
    for size in TITLE_SIZES:
        lines = _wrap(cleaned, _font(size), width)
        if len(lines) <= TITLE_MAX_LINES:
            break
    if len(lines) > TITLE_LAST_RESORT_LINES:
        lines = lines[:TITLE_LAST_RESORT_LINES]
        lines[-1] = _cut(lines[-1], _font(size), width)
    ascent, _ = _font(size).getmetrics()
    step = round(size * LINE_SPACING)
    block = step * (len(lines) - 1) + size
    top = TITLE_BAND[0] + (TITLE_BAND[1] - TITLE_BAND[0] - block) // 2
    title_lines = [TextLine(line, size, top + ascent + i * step) for i, line in enumerate(lines)]

    qr = qr_code(payload)
    modules, _ = qr.symbol_size(scale=1, border=QR_BORDER)
    module_px = QR_TARGET_PX // int(modules)
    qr_px = int(modules) * module_px
    qr_x = (PAGE_WIDTH - qr_px) // 2
    instruction_top = QR_TOP + qr_px + 120
    instruction_ascent, _ = _font(INSTRUCTION_SIZE).getmetrics()
    instruction = TextLine(INSTRUCTION, INSTRUCTION_SIZE, instruction_top + instruction_ascent)
    return Layout(title_lines, instruction, qr, qr_x, QR_TOP, module_px)


def render_png(title: str, payload: str) -> bytes:
    """An A4 PNG poster at 300 dpi (grayscale: black on white prints crisply)."""
    spec = layout(title, payload)
    page = Image.new("L", (PAGE_WIDTH, PAGE_HEIGHT), 255)
    draw = ImageDraw.Draw(page)
    for line in [*spec.title, spec.instruction]:
        draw.text(
            (PAGE_WIDTH // 2, line.baseline), line.text, fill=0, font=_font(line.size), anchor="ms"
        )
    rows = list(spec.qr.matrix_iter(scale=1, border=QR_BORDER))
    modules = len(rows)
    pixels = bytes(0 if dark else 255 for row in rows for dark in row)
    symbol = Image.frombytes("L", (modules, modules), pixels)
    # Nearest neighbour keeps every module a sharp square of whole pixels.
    symbol = symbol.resize((spec.qr_px, spec.qr_px), Image.Resampling.NEAREST)
    page.paste(symbol, (spec.qr_x, spec.qr_y))
    out = io.BytesIO()
    page.save(out, format="PNG", dpi=(DPI, DPI))
    return out.getvalue()


def _svg_text(line: TextLine) -> str:
    safe = escape(_NOT_XML.sub("\ufffd", line.text))
    return (
        f'<text x="{PAGE_WIDTH // 2}" y="{line.baseline}" font-size="{line.size}" '
        f'text-anchor="middle" font-family={quoteattr(FONT_FAMILY)}>{safe}</text>'
    )


def render_svg(title: str, payload: str) -> bytes:
    """An A4 SVG poster with the layout of the PNG (user units are 300 dpi pixels).

    The name is escaped for XML, and characters XML cannot hold at all are replaced
    by U+FFFD, so no venue name can break or inject into the document."""
    spec = layout(title, payload)
    qr_svg = spec.qr.svg_inline(
        scale=spec.module_px, border=QR_BORDER, svgclass=None, lineclass=None
    )
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="210mm" height="297mm" '
        f'viewBox="0 0 {PAGE_WIDTH} {PAGE_HEIGHT}">',
        f'<rect width="{PAGE_WIDTH}" height="{PAGE_HEIGHT}" fill="#fff"/>',
        *(_svg_text(line) for line in spec.title),
        f'<g transform="translate({spec.qr_x} {spec.qr_y})">{qr_svg}</g>',
        _svg_text(spec.instruction),
        "</svg>",
    ]
    return "\n".join(parts).encode()
