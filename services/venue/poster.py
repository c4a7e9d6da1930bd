"""Printable venue posters: the venue's name, its signed QR code, and the instruction
in Khmer and English, as an A4 wall poster or an A6 table card, in PNG, SVG or PDF.

Pure functions (text in, bytes out; the only I/O is the PDF's font subsets in a
temporary directory, since fpdf2 reads fonts from files), so the service can run them in a
worker thread (a 300 dpi raster or a font subset takes tens to hundreds of
milliseconds of CPU, too long to hold the event loop) and tests can call them.

One layout (`layout`) serves the three formats, in 300 dpi pixels; A6 is A4 at half
the scale (ISO 216 pages share one shape). Text is shaped and broken by
`services.venue.typeset`, which refuses what it cannot draw (Unrenderable), so no
format ever prints boxes or dotted circles. PNG is drawn by Pillow with Raqm; SVG
carries each font it uses as a subset (WOFF, in @font-face), so any viewer shows the
same glyphs; PDF is drawn by fpdf2 with HarfBuzz shaping and embedded subsets.

The QR code is large (about 14 cm on A4, 7 cm on A6) and keeps its 4-module quiet
zone, because phone cameras at arm's length and in poor light are what it must
survive; error correction Q tolerates a quarter of the code being smudged, torn or
covered by tape.
"""

from __future__ import annotations

import base64
import io
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import segno
from fontTools import subset
from fontTools.varLib import instancer
from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont

from services.domain.text import khmer
from services.venue import typeset
from services.venue.typeset import Face, Run, Unrenderable

__all__ = ["A4", "A6", "Unrenderable", "layout", "render_pdf", "render_png", "render_svg"]

DPI = 300


@dataclass(frozen=True)
class PageSize:
    name: str
    width_mm: int
    height_mm: int

    @property
    def width_px(self) -> int:
        return round(self.width_mm / 25.4 * DPI)

    @property
    def height_px(self) -> int:
        return round(self.height_mm / 25.4 * DPI)

    @property
    def scale(self) -> float:
        """Of this page's layout against A4's."""
        return self.width_px / A4_WIDTH_PX


A4 = PageSize("A4", 210, 297)
A6 = PageSize("A6", 105, 148)
A4_WIDTH_PX = 2480

# The layout on A4 in 300 dpi pixels; other sizes scale it.
MARGIN = 200
QR_BORDER = 4
"""Quiet zone in modules; the QR standard asks for 4."""
QR_TARGET_PX = 1700
"""The QR code with its quiet zone is at most this wide (about 14 cm on A4)."""
QR_TOP = 960
TITLE_BAND = (200, 900)
"""The title's lines are centred vertically between these y coordinates."""
TITLE_SIZES = (200, 170, 140, 120, 100, 84, 70)
"""Title font sizes tried in turn until the name fits the band in TITLE_MAX_LINES lines."""
TITLE_MAX_LINES = 3
TITLE_LAST_RESORT_LINES = 4
"""At the smallest size, a name may take one more line before it is cut short."""
TITLE_WEIGHT, TEXT_WEIGHT = 700, 500
INSTRUCTIONS = (("ស្កេនដើម្បីចុះឈ្មោះចូល", 104), ("Scan to check in", 92))
"""The instruction in Khmer, then English, with their sizes."""
INSTRUCTION_GAP = 90
LINE_GAP = 0.15
"""Extra space between lines, in ems: Khmer stacks reach far above and below."""
ELLIPSIS = "\u2026"

# Characters XML 1.0 cannot carry at all, not even escaped. A proto string is
# valid UTF-8 but may still hold U+FFFE, U+FFFF or C0 controls.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def qr_code(payload: str) -> segno.QRCode:
    """The QR symbol of a venue payload (never a Micro QR: phones may not read those)."""
    return segno.make(payload, error="q", micro=False)


class _Fonts:
    """Pillow fonts of one layout call (one thread), made once per face, size, weight."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, int, int], ImageFont.FreeTypeFont] = {}

    def get(self, face: Face, size: int, weight: int) -> ImageFont.FreeTypeFont:
        key = (face.key, size, weight)
        if key not in self._made:
            self._made[key] = face.pil(size, weight)
        return self._made[key]

    def width(self, text: str, size: int, weight: int) -> float:
        return sum(
            self.get(r.face, size, weight).getlength(r.text, language=_language(r))
            for r in typeset.runs(text)
        )

    def metrics(self, size: int, weight: int) -> tuple[int, int]:
        """Ascent and descent of the tallest face (Khmer: stacks and vowels above)."""
        sized = [self.get(face, size, weight).getmetrics() for face in typeset.faces()]
        return max(a for a, _ in sized), max(d for _, d in sized)


def _language(run: Run) -> str | None:
    return khmer.LOCALE if run.script == typeset.KHMER else None


def wrap(text: str, fonts: _Fonts, size: int, weight: int, width: float) -> list[str]:
    """Break `text` into lines no wider than `width`: at ICU's line-break
    opportunities (Khmer word boundaries, spaces), between syllables only when one
    word alone is too wide, never inside a stack or a grapheme cluster."""
    lines: list[str] = []
    current = ""

    def fits(candidate: str) -> bool:
        return fonts.width(candidate.strip(), size, weight) <= width

    for segment in typeset.line_segments(text):
        if fits(current + segment):
            current += segment
            continue
        if current.strip():
            lines.append(current.strip())
        current = ""
        if fits(segment):
            current = segment
            continue
        for syllable in khmer.syllables(segment):
            if current and not fits(current + syllable):
                lines.append(current.strip())
                current = ""
            current += syllable
    if current.strip():
        lines.append(current.strip())
    return lines


def _cut(line: str, fonts: _Fonts, size: int, weight: int, width: float) -> str:
    """`line` shortened, a whole syllable at a time, to end in an ellipsis and fit."""
    parts = khmer.syllables(line)
    while parts and fonts.width("".join(parts).rstrip() + ELLIPSIS, size, weight) > width:
        parts.pop()
    return "".join(parts).rstrip() + ELLIPSIS


@dataclass(frozen=True)
class TextLine:
    runs: tuple[Run, ...]
    size: int
    weight: int
    baseline: int
    """y of the baseline; the line is centred on the page horizontally."""
    widths: tuple[float, ...]
    """Advance of each run in pixels, as Pillow's Raqm measured it."""

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.runs)

    @property
    def width(self) -> float:
        return sum(self.widths)


@dataclass(frozen=True)
class Layout:
    page: PageSize
    title: list[TextLine]
    instructions: list[TextLine]
    qr: segno.QRCode
    qr_x: int
    qr_y: int
    module_px: int

    @property
    def qr_px(self) -> int:
        width, _ = self.qr.symbol_size(scale=1, border=QR_BORDER)
        return int(width) * self.module_px

    @property
    def lines(self) -> list[TextLine]:
        return [*self.title, *self.instructions]


def _line(text: str, fonts: _Fonts, size: int, weight: int, baseline: int) -> TextLine:
    runs = tuple(typeset.runs(text))
    for run in runs:
        typeset.check_shaped(run, weight)
    widths = tuple(
        fonts.get(r.face, size, weight).getlength(r.text, language=_language(r)) for r in runs
    )
    return TextLine(runs, size, weight, baseline, widths)


def layout(title: str, payload: str, page: PageSize = A4) -> Layout:
    """Where everything goes on the page, in 300 dpi pixels. Raises Unrenderable
    when the name holds what the fonts cannot draw or the shaper cannot form."""
    fonts = _Fonts()
    scale = page.scale
    width = page.width_px - 2 * MARGIN * scale
    cleaned = " ".join(title.split())
    band_top, band_bottom = (round(y * scale) for y in TITLE_BAND)
    sizes = [round(s * scale) for s in TITLE_SIZES]
    size, lines = sizes[-1], [cleaned]

    def block_height(size: int, count: int) -> int:
        ascent, descent = fonts.metrics(size, TITLE_WEIGHT)
        return round(ascent + descent + LINE_GAP * size) * (count - 1) + ascent + descent

    for size in sizes:
        lines = wrap(cleaned, fonts, size, TITLE_WEIGHT, width)
        if (
            len(lines) <= TITLE_MAX_LINES
            and block_height(size, len(lines)) <= band_bottom - band_top
        ):
            break
    if len(lines) > TITLE_LAST_RESORT_LINES:
        lines = lines[:TITLE_LAST_RESORT_LINES]
        lines[-1] = _cut(lines[-1], fonts, size, TITLE_WEIGHT, width)
    ascent, descent = fonts.metrics(size, TITLE_WEIGHT)
    step = round(ascent + descent + LINE_GAP * size)
    block = block_height(size, len(lines))
    top = band_top + (band_bottom - band_top - block) // 2
    title_lines = [
        _line(line, fonts, size, TITLE_WEIGHT, top + ascent + i * step)
        for i, line in enumerate(lines)
    ]

    qr = qr_code(payload)
    modules, _ = qr.symbol_size(scale=1, border=QR_BORDER)
    module_px = round(QR_TARGET_PX * scale) // int(modules)
    qr_px = int(modules) * module_px
    qr_x = (page.width_px - qr_px) // 2
    qr_y = round(QR_TOP * scale)
    y = qr_y + qr_px + round(INSTRUCTION_GAP * scale)
    instructions = []
    for text, base_size in INSTRUCTIONS:
        isize = round(base_size * scale)
        iascent, idescent = fonts.metrics(isize, TEXT_WEIGHT)
        instructions.append(_line(text, fonts, isize, TEXT_WEIGHT, y + iascent))
        y += iascent + idescent
    return Layout(page, title_lines, instructions, qr, qr_x, qr_y, module_px)


def _dark_spans(spec: Layout) -> list[tuple[int, int, int]]:
    """The QR's dark modules as (row, first column, length) runs, quiet zone included."""
    spans = []
    for y, cells in enumerate(spec.qr.matrix_iter(scale=1, border=QR_BORDER)):
        x = 0
        row = list(cells)
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                spans.append((y, start, x - start))
            else:
                x += 1
    return spans


def render_png(title: str, payload: str, page: PageSize = A4) -> bytes:
    """A PNG poster at 300 dpi (grayscale: black on white prints crisply)."""
    spec = layout(title, payload, page)
    image = Image.new("L", (page.width_px, page.height_px), 255)
    draw = ImageDraw.Draw(image)
    fonts = _Fonts()
    for line in spec.lines:
        x = (page.width_px - line.width) / 2
        for run, advance in zip(line.runs, line.widths, strict=True):
            draw.text(
                (x, line.baseline),
                run.text,
                fill=0,
                font=fonts.get(run.face, line.size, line.weight),
                anchor="ls",
                language=_language(run),
            )
            x += advance
    rows = list(spec.qr.matrix_iter(scale=1, border=QR_BORDER))
    modules = len(rows)
    pixels = bytes(0 if dark else 255 for row in rows for dark in row)
    symbol = Image.frombytes("L", (modules, modules), pixels)
    # Nearest neighbour keeps every module a sharp square of whole pixels.
    symbol = symbol.resize((spec.qr_px, spec.qr_px), Image.Resampling.NEAREST)
    image.paste(symbol, (spec.qr_x, spec.qr_y))
    out = io.BytesIO()
    image.save(out, format="PNG", dpi=(DPI, DPI))
    return out.getvalue()


def _family(face: Face, weight: int) -> str:
    return f"{face.key}{weight}"


def _texts_by_font(spec: Layout) -> dict[tuple[Face, int], str]:
    """The characters each (face, weight) draws on the page: what its subset keeps."""
    texts: dict[tuple[Face, int], str] = defaultdict(str)
    for line in spec.lines:
        for run in line.runs:
            texts[(run.face, line.weight)] += run.text
    return texts


def font_subset(face: Face, weight: int, text: str, flavor: str | None = "woff") -> bytes:
    """A static font (WOFF, or TrueType with `flavor` None) of `face` at `weight`
    holding only the glyphs `text` needs, with every layout feature kept, so the
    viewer's shaper forms Khmer stacks as ours does."""
    font = face.ttfont()
    options = subset.Options()
    options.layout_features = ["*"]
    options.hinting = False
    options.desubroutinize = True
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=text)
    subsetter.subset(font)
    static = instancer.instantiateVariableFont(font, {"wght": weight, "wdth": 100})
    static.flavor = flavor
    out = io.BytesIO()
    static.save(out)
    return out.getvalue()


def _svg_text(line: TextLine, page: PageSize, families: str) -> str:
    safe = escape(_NOT_XML.sub("\ufffd", line.text))
    lang = "km" if any(r.script == typeset.KHMER for r in line.runs) else "en"
    return (
        f'<text x="{page.width_px // 2}" y="{line.baseline}" font-size="{line.size}" '
        f'font-weight="{line.weight}" text-anchor="middle" xml:lang="{lang}" '
        f"font-family={quoteattr(families)}>{safe}</text>"
    )


def render_svg(title: str, payload: str, page: PageSize = A4) -> bytes:
    """An SVG poster with the layout of the PNG (user units are 300 dpi pixels) and
    its fonts embedded as subsets.

    The name is escaped for XML, and characters XML cannot hold at all are replaced
    by U+FFFD, so no venue name can break or inject into the document."""
    spec = layout(title, payload, page)
    faces_css = []
    families: dict[int, list[str]] = defaultdict(list)
    for (face, weight), text in _texts_by_font(spec).items():
        woff = base64.b64encode(font_subset(face, weight, text)).decode()
        faces_css.append(
            f'@font-face{{font-family:"{_family(face, weight)}";font-weight:{weight};'
            f'src:url(data:font/woff;base64,{woff}) format("woff")}}'
        )
    for face in typeset.faces():
        for (used, weight), _ in _texts_by_font(spec).items():
            if used == face:
                families[weight].append(_family(face, weight))
    qr_svg = spec.qr.svg_inline(
        scale=spec.module_px, border=QR_BORDER, svgclass=None, lineclass=None
    )
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{page.width_mm}mm" '
        f'height="{page.height_mm}mm" viewBox="0 0 {page.width_px} {page.height_px}">',
        f"<style>{''.join(faces_css)}</style>",
        f'<rect width="{page.width_px}" height="{page.height_px}" fill="#fff"/>',
        *(
            _svg_text(line, page, ", ".join([*families[line.weight], "sans-serif"]))
            for line in spec.title
        ),
        f'<g transform="translate({spec.qr_x} {spec.qr_y})">{qr_svg}</g>',
        *(
            _svg_text(line, page, ", ".join([*families[line.weight], "sans-serif"]))
            for line in spec.instructions
        ),
        "</svg>",
    ]
    return "\n".join(parts).encode()


def _pt(px: float) -> float:
    return px * 72 / DPI


def render_pdf(title: str, payload: str, page: PageSize = A4) -> bytes:
    """A one-page PDF poster with the layout of the PNG: text shaped by HarfBuzz in
    embedded font subsets, the QR code as filled rectangles."""
    spec = layout(title, payload, page)
    pdf = FPDF(unit="pt", format=(_pt(page.width_px), _pt(page.height_px)))
    pdf.set_auto_page_break(False)
    pdf.set_margin(0)
    pdf.c_margin = 0  # a cell's text starts at its x, as the PNG's runs do
    pdf.set_creator("Stop COVID")
    pdf.add_page()
    with tempfile.TemporaryDirectory(prefix="stopcovid-poster-") as fonts_dir:
        # fpdf2 reads fonts from files: hand it our small static subsets rather
        # than whole variable fonts, which it would instance (seconds for Noto Sans).
        for (face, weight), text in _texts_by_font(spec).items():
            path = Path(fonts_dir, f"{_family(face, weight)}.ttf")
            path.write_bytes(font_subset(face, weight, text, flavor=None))
            pdf.add_font(_family(face, weight), "", path)
        for line in spec.lines:
            x = (page.width_px - line.width) / 2
            size_pt = _pt(line.size)
            for run, advance in zip(line.runs, line.widths, strict=True):
                pdf.set_text_shaping(
                    use_shaping_engine=True,
                    script=run.script,
                    language="khm" if run.script == typeset.KHMER else "eng",
                )
                pdf.set_font(_family(run.face, line.weight), size=size_pt)
                # fpdf2 puts a cell's baseline 0.5 h + 0.3 font size below its top.
                pdf.set_xy(_pt(x), _pt(line.baseline) - 0.8 * size_pt)
                pdf.cell(w=_pt(advance) + size_pt, h=size_pt, text=run.text, align="L")
                x += advance
        pdf.set_fill_color(0)
        module = _pt(spec.module_px)
        for row, column, length in _dark_spans(spec):
            pdf.rect(
                _pt(spec.qr_x) + column * module,
                _pt(spec.qr_y) + row * module,
                length * module,
                module,
                style="F",
            )
        return bytes(pdf.output())
