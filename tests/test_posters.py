"""Posters in Khmer and English: shaping, line breaks, sizes, formats, and a QR code
that a real decoder reads back from every format.

The QR decoder is ZXing (zxing-cpp); the PDF is rasterised by PDFium (pypdfium2)
and the SVG by resvg (resvg-py), so each format is read as a printer or a phone
would see it, not from our own layout objects.
"""

from __future__ import annotations

import base64
import io
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pypdfium2
import pytest
import resvg_py
import stopcovid.client as clients
import zxingcpp
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont, features
from stopcovid.client import VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.domain.text import khmer
from services.kernel.config import Settings
from services.venue import poster, typeset
from services.venue.service import VenueService
from tests.support.servers import Servers
from tests.support.venue_helpers import create_venue, venue_client

PSAR_THMEI = "ផ្សារធំថ្មី"
"""Phsar Thmei, Phnom Penh's Central Market: a subscript (្ស) and a vowel above (ី)
over a subscript (្ម)."""
LONG_KHMER = "មជ្ឈមណ្ឌលពាណិជ្ជកម្មអន្តរជាតិនៃរាជធានីភ្នំពេញនិងផ្សារទំនើបសម្រាប់ប្រជាពលរដ្ឋ"
"""No spaces, as Khmer is written: word breaks must come from a dictionary."""
PAYLOAD = "V1.v1." + "A" * 107
SVG = "{http://www.w3.org/2000/svg}"


def _khmer_run(text: str) -> typeset.Run:
    (run,) = typeset.runs(text)
    assert run.face.key == "StopCovidKhmer" and run.script == typeset.KHMER
    return run


def test_khmer_is_shaped_into_clusters_not_code_points() -> None:
    run = _khmer_run(PSAR_THMEI)
    glyphs = typeset.check_shaped(run, poster.TITLE_WEIGHT)
    clusters = {g.cluster for g in glyphs}
    # Each coeng with its consonant becomes one subscript glyph: fewer glyphs than
    # code points, and fewer clusters than glyphs would be were it unshaped.
    assert len(glyphs) < len(PSAR_THMEI)
    assert len(clusters) < len(PSAR_THMEI)
    assert 0 not in {g.glyph_id for g in glyphs}
    ids = [g.glyph_id for g in glyphs]
    assert run.face.glyph_id(typeset.DOTTED_CIRCLE) not in ids
    # A coeng never survives as a visible glyph of its own.
    assert run.face.glyph_id(ord(khmer.COENG)) not in ids


def test_a_pre_base_vowel_is_drawn_before_its_consonant() -> None:
    """កែ is stored ក then ែ but written with ែ's left part first: the shaper
    reorders, a per-code-point renderer cannot."""
    run = _khmer_run("កែ")
    ids = [g.glyph_id for g in typeset.shape(run, poster.TEXT_WEIGHT)]
    ka = run.face.glyph_id(ord("ក"))
    assert ka in ids and ids.index(ka) > 0, "something is drawn before the consonant"


def test_pillow_draws_what_harfbuzz_shaped() -> None:
    """The PNG's own layout engine is Raqm: its advance equals HarfBuzz's, which a
    renderer drawing code point by code point (Pillow's basic layout) misses."""
    assert features.check("raqm")
    run = _khmer_run(PSAR_THMEI)
    size = 200
    shaped = sum(g.x_advance for g in typeset.shape(run, poster.TITLE_WEIGHT))
    units = run.face.ttfont()["head"].unitsPerEm
    raqm = run.face.pil(size, poster.TITLE_WEIGHT).getlength(PSAR_THMEI)
    assert raqm == pytest.approx(shaped * size / units, abs=1.0)
    basic = ImageFont.truetype(str(run.face.path), size, layout_engine=ImageFont.Layout.BASIC)
    assert abs(basic.getlength(PSAR_THMEI) - raqm) > size / 4


def test_subscripts_are_stacked_below_not_beside() -> None:
    """ក្ក drawn shaped is one consonant wide with ink below the baseline (the
    subscript); unshaped it would be three glyphs side by side."""
    face = typeset.faces()[0]
    font = face.pil(200, poster.TEXT_WEIGHT)
    image = Image.new("L", (800, 600), 255)
    ImageDraw.Draw(image).text((100, 300), "ក្ក", font=font, fill=0, anchor="ls", language="km")
    box = Image.eval(image, lambda v: 255 - v).getbbox()
    assert box is not None
    left, _, right, bottom = box
    single = font.getlength("ក")
    assert right - left < 1.3 * single
    assert bottom > 300 + 20  # the subscript hangs below the baseline


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("ាផ្សារ", "no consonant"),  # a dependent vowel with nothing to attach to
        ("្សផ្សារ", "no consonant"),  # a subscript with no base
        ("中央市场", "U+4E2D"),  # no font of the poster draws Chinese
        ("Market \U0001f600", "U+1F600"),
    ],
)
def test_unformable_or_undrawable_names_are_refused(name: str, says: str) -> None:
    with pytest.raises(poster.Unrenderable, match=says.replace("+", "\\+")):
        poster.layout(name, PAYLOAD)


def test_fonts_cover_khmer_english_and_vietnamese() -> None:
    runs = typeset.runs("ផ្សារ Café Phở")
    assert "".join(r.text for r in runs) == "ផ្សារ Café Phở"
    assert [r.face.key for r in runs][-1] == "StopCovidLatin"  # ở is not in Noto Sans Khmer
    for run in runs:
        typeset.check_shaped(run, poster.TEXT_WEIGHT)


def _break_offsets(text: str) -> set[int]:
    offsets, at = set(), 0
    for segment in typeset.line_segments(text):
        at += len(segment)
        offsets.add(at)
    return offsets


@pytest.mark.parametrize("page", [poster.A4, poster.A6])
def test_long_khmer_name_wraps_at_word_boundaries(page: poster.PageSize) -> None:
    spec = poster.layout(LONG_KHMER, PAYLOAD, page)
    lines = [line.text for line in spec.title]
    assert len(lines) >= 2
    assert "".join(lines) == LONG_KHMER  # nothing lost, nothing cut
    allowed = _break_offsets(LONG_KHMER)
    at = 0
    for line in lines[:-1]:
        at += len(line)
        assert at in allowed, f"break inside a word after {line!r}"
    width = page.width_px - 2 * poster.MARGIN * page.scale
    for shown in spec.title:
        assert shown.width <= width
        assert unicodedata.category(shown.text[0])[0] != "M"  # no line starts with a mark
        assert not shown.text.endswith(khmer.COENG)


def test_a_word_wider_than_the_page_breaks_between_syllables_only() -> None:
    """A run ICU finds no word in falls back to syllables: never between a coeng
    and its consonant, never inside a grapheme cluster."""
    word = "ស្ត្រី" * 60
    fonts = poster._Fonts()
    lines = poster.wrap(word, fonts, 200, poster.TITLE_WEIGHT, 1500)
    assert len(lines) > 1 and "".join(lines) == word
    assert all(line.startswith("ស្ត្រី") and not line.endswith(khmer.COENG) for line in lines)
    assert khmer.syllables("ស្ត្រី") == ["ស្ត្រី"]


def test_too_long_a_name_is_cut_at_a_syllable_with_an_ellipsis() -> None:
    spec = poster.layout("ស្ត្រី" * 200, PAYLOAD)
    assert len(spec.title) == poster.TITLE_LAST_RESORT_LINES
    last = spec.title[-1].text
    assert last.endswith(poster.ELLIPSIS)
    assert last[: -len(poster.ELLIPSIS)].endswith("ស្ត្រី")


def test_shaping_missing_stops_the_venue_server(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setattr(features, "check", lambda feature: False)
    with pytest.raises(typeset.ShapingUnavailable, match="libfribidi"):
        VenueService(None, settings)  # type: ignore[arg-type]


# -- through the server, every format and size ----------------------------------------


@pytest.fixture
def venues(servers: Servers) -> Iterator[VenueClient]:
    with venue_client(servers) as client:
        yield client


QR_ONLY = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)


def _decode(image: Image.Image) -> list[str]:
    """The QR codes a phone finds. Only QR: the linear decoders now and then read a
    Codabar out of the strokes of the text (a flake, not a second code)."""
    found = zxingcpp.read_barcodes(image.convert("L"), formats=QR_ONLY)
    return [r.text for r in found]


def _as_image(fmt: int, content: bytes) -> Image.Image:
    if fmt == pb.POSTER_FORMAT_PNG:
        return Image.open(io.BytesIO(content))
    if fmt == pb.POSTER_FORMAT_PDF:
        document = pypdfium2.PdfDocument(content)
        try:
            rendered: Image.Image = document[0].render(scale=300 / 72).to_pil()
            return rendered
        finally:
            document.close()
    png = resvg_py.svg_to_bytes(svg_string=content.decode(), dpi=300, background="#ffffff")
    return Image.open(io.BytesIO(bytes(png)))


SIZES_PX: dict[int, tuple[int, int]] = {
    pb.POSTER_SIZE_A4: (2480, 3508),
    pb.POSTER_SIZE_A6: (1240, 1748),
}
TYPES: dict[int, str] = {
    pb.POSTER_FORMAT_PNG: "image/png",
    pb.POSTER_FORMAT_SVG: "image/svg+xml",
    pb.POSTER_FORMAT_PDF: "application/pdf",
}


@pytest.mark.parametrize("size", [pb.POSTER_SIZE_A4, pb.POSTER_SIZE_A6])
@pytest.mark.parametrize("fmt", list(TYPES))
def test_every_format_and_size_carries_a_qr_that_decodes(
    venues: VenueClient, fmt: int, size: int
) -> None:
    venue = create_venue(venues, PSAR_THMEI)
    payload = venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=venue.venue_id)).payload
    made = venues.rpc.RenderVenuePoster(
        pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=fmt, size=size)  # type: ignore[arg-type]
    )
    assert made.content_type == TYPES[fmt]
    image = _as_image(fmt, made.content)
    width, height = SIZES_PX[size]
    assert abs(image.width - width) <= 1 and abs(image.height - height) <= 1
    assert _decode(image) == [payload]


def test_svg_embeds_subset_fonts_that_draw_the_name(venues: VenueClient) -> None:
    venue = create_venue(venues, f"{PSAR_THMEI} Central Market")
    made = venues.rpc.RenderVenuePoster(
        pb.RenderVenuePosterRequest(
            venue_id=venue.venue_id, format=pb.POSTER_FORMAT_SVG, size=pb.POSTER_SIZE_A6
        )
    )
    root = ET.fromstring(made.content)  # noqa: S314 - our own output
    assert (root.get("width"), root.get("height")) == ("105mm", "148mm")
    style = root.find(f"{SVG}style")
    assert style is not None and style.text is not None
    sources = style.text.split("base64,")[1:]
    assert sources, "no embedded font"
    fonts = [TTFont(io.BytesIO(base64.b64decode(s.split(")")[0]))) for s in sources]
    for font in fonts:
        assert font.flavor == "woff"
        assert "GSUB" in font and "fvar" not in font  # shaping kept; a static instance
        assert len(font.getGlyphOrder()) < 200  # a subset, not the whole font
    covered = set().union(*(f.getBestCmap() for f in fonts))
    assert {ord(c) for c in f"{PSAR_THMEI}Central Market"} <= covered
    lines = list(root.iter(f"{SVG}text"))
    assert " ".join(t.text or "" for t in lines[:-2]) == f"{PSAR_THMEI} Central Market"
    assert (lines[0].get("font-family") or "").startswith("StopCovidKhmer")


def test_pdf_embeds_its_fonts_and_is_one_page(venues: VenueClient) -> None:
    venue = create_venue(venues, PSAR_THMEI)
    made = venues.rpc.RenderVenuePoster(
        pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=pb.POSTER_FORMAT_PDF)
    )
    assert made.content.startswith(b"%PDF-")
    assert b"/FontFile2" in made.content  # TrueType subsets inside, no system fonts needed
    document = pypdfium2.PdfDocument(made.content)
    try:
        assert len(document) == 1
        width, height = document[0].get_size()
        assert (round(width / 72 * 25.4), round(height / 72 * 25.4)) == (210, 297)
        text = document[0].get_textpage().get_text_range()
        assert "Scan to check in" in text
    finally:
        document.close()


def test_poster_refusals_are_precise(venues: VenueClient) -> None:
    venue = create_venue(venues, PSAR_THMEI)
    with pytest.raises(clients.InvalidArgument) as bad_size:
        venues.rpc.RenderVenuePoster(
            pb.RenderVenuePosterRequest(
                venue_id=venue.venue_id,
                format=pb.POSTER_FORMAT_PDF,
                size=99,  # type: ignore[arg-type]
            )
        )
    assert bad_size.value.metadata["field"] == "size"
    unprintable = create_venue(venues, "中央市场")
    for fmt in TYPES:
        with pytest.raises(clients.FailedPrecondition) as refused:
            venues.rpc.RenderVenuePoster(
                pb.RenderVenuePosterRequest(venue_id=unprintable.venue_id, format=fmt)  # type: ignore[arg-type]
            )
        assert refused.value.reason == "FAILED_PRECONDITION"
        assert "U+4E2D" in str(refused.value)


@pytest.mark.parametrize("page", [poster.A4, poster.A6])
def test_pdf_draws_the_title_where_the_png_does(page: poster.PageSize) -> None:
    """Two shapers (Raqm for the PNG, HarfBuzz through fpdf2 for the PDF) from one
    layout: the title's ink lands in the same box, to a few pixels at 300 dpi."""
    png = _as_image(pb.POSTER_FORMAT_PNG, poster.render_png(PSAR_THMEI, PAYLOAD, page))
    pdf = _as_image(pb.POSTER_FORMAT_PDF, poster.render_pdf(PSAR_THMEI, PAYLOAD, page))
    band = (0, 0, page.width_px, round(poster.TITLE_BAND[1] * page.scale))
    boxes = [Image.eval(i.convert("L").crop(band), lambda v: 255 - v).getbbox() for i in (png, pdf)]
    assert boxes[0] is not None and boxes[1] is not None
    assert all(abs(a - b) <= 3 for a, b in zip(boxes[0], boxes[1], strict=True)), boxes
