"""Khmer and Latin text for posters: fonts, shaping, and where lines may break.

Khmer is written with stacked consonants (a coeng, U+17D2, puts the next consonant
below), vowels drawn before the consonant they follow in memory, and no spaces
between words. So:

- glyphs come from a shaper, never one per code point: Pillow's Raqm layout engine
  (HarfBuzz inside) draws, and HarfBuzz (uharfbuzz) checks each run, so a name the
  fonts cannot draw or the shaper cannot form is refused instead of printed with
  boxes (.notdef) or dotted circles (U+25CC, HarfBuzz's sign of a mark with no base);
- lines break where ICU's line breaker allows (a dictionary finds Khmer words),
  and, when a single word is wider than the page, between syllables
  (services.domain.text.khmer), never inside a stack.

Two OFL fonts from PyPI: Noto Sans Khmer (Khmer and basic Latin) and Noto Sans
(the rest of Latin, Greek, Cyrillic, Vietnamese). Each grapheme cluster stays in
the font of the text before it if that font has all its characters, and otherwise
takes the first font that has.
"""

from __future__ import annotations

import functools
import io
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import fontpkg
import uharfbuzz as hb
from fontTools.ttLib import TTFont
from icu4py.breakers import LineBreaker
from PIL import ImageFont, features

from services.domain.text.khmer import LOCALE, grapheme_clusters

DOTTED_CIRCLE = 0x25CC
KHMER, LATIN = "khmr", "latn"
"""OpenType script tags of the two scripts a poster is set in."""


class ShapingUnavailable(RuntimeError):
    """Pillow was built or installed without Raqm (or cannot load FriBiDi), so it
    would draw Khmer one code point at a time."""


class Unrenderable(ValueError):
    """Text the poster fonts cannot draw, or Khmer the shaper cannot form. The
    message names code points only, so it is safe to return to a caller."""


def require_shaping() -> None:
    """Raise ShapingUnavailable unless Pillow can shape complex scripts."""
    if not features.check("raqm"):
        raise ShapingUnavailable(
            "Pillow's Raqm layout engine is not available, so Khmer cannot be shaped "
            "(posters would show detached subscripts and dotted circles). Pillow's "
            "wheels bundle Raqm and HarfBuzz but load FriBiDi from the system: install "
            "it (Debian/Ubuntu: apt-get install libfribidi0; Fedora: dnf install fribidi; "
            "macOS: brew install fribidi)."
        )


@dataclass(frozen=True)
class Face:
    key: str
    """Short name, also the font's CSS family in SVG posters."""
    path: Path

    def ttfont(self) -> TTFont:
        """A fresh fontTools object (subsetting changes it), read whole so it holds
        no open file."""
        return TTFont(io.BytesIO(self.path.read_bytes()))

    @functools.cached_property
    def cmap(self) -> frozenset[int]:
        return frozenset(self.ttfont().getBestCmap())

    def glyph_id(self, char: int) -> int | None:
        """The glyph `char` maps to, or None."""
        font = self.ttfont()
        name = font.getBestCmap().get(char)
        return font.getGlyphID(name) if name else None

    @functools.cached_property
    def hb_face(self) -> hb.Face:
        # An hb_face is immutable and safe to share between threads; fonts made
        # from it (per call, since variations are set on them) are not shared.
        return hb.Face(hb.Blob.from_file_path(str(self.path)))

    def pil(self, size: int, weight: int) -> ImageFont.FreeTypeFont:
        """A Pillow font using Raqm. A new object per call: FreeType faces are not
        safe to share between threads."""
        font = ImageFont.truetype(str(self.path), size, layout_engine=ImageFont.Layout.RAQM)
        font.set_variation_by_axes(
            [
                float(weight if axis["name"] == b"Weight" else axis["default"] or 0)
                for axis in font.get_variation_axes()
            ]
        )
        return font


@functools.cache
def faces() -> tuple[Face, ...]:
    """The fonts, in order of preference."""
    return (
        Face("StopCovidKhmer", Path(fontpkg.path("Noto Sans Khmer"))),
        Face("StopCovidLatin", Path(fontpkg.path("Noto Sans"))),
    )


@dataclass(frozen=True)
class Run:
    """Text set in one font and one script."""

    text: str
    face: Face
    script: str


class Glyph(NamedTuple):
    """One shaped glyph. A tuple, not a dataclass: a poster shapes thousands."""

    glyph_id: int
    cluster: int  # index in the run's text of the first code point it belongs to
    x_advance: int


def _needs_glyph(char: str) -> bool:
    # Format characters (ZWSP, ZWNJ, ZWJ, word joiner, BOM) are layout controls
    # the shaper hides; Khmer typists put ZWSP between words.
    return unicodedata.category(char) != "Cf"


def _is_khmer(char: str) -> bool:
    return "\u1780" <= char <= "\u17ff" or "\u19e0" <= char <= "\u19ff"


def _neutral(char: str) -> bool:
    """Spaces, digits and punctuation take the script of the text around them."""
    return not _needs_glyph(char) or unicodedata.category(char)[0] in "ZNPS"


def line_segments(text: str) -> list[str]:
    """`text` cut at every line-break opportunity ICU finds (Khmer words by
    dictionary, Latin at spaces and hyphens); each piece keeps its trailing blanks."""
    return list(LineBreaker(text, LOCALE))


def runs(text: str) -> list[Run]:
    """`text` split into runs of one font and script. Raises Unrenderable naming
    the code points no font has."""
    found: list[Run] = []
    missing: list[str] = []
    for cluster in grapheme_clusters(text):
        needed = [c for c in cluster if _needs_glyph(c)]
        script = KHMER if any(_is_khmer(c) for c in cluster) else LATIN
        neutral = all(_neutral(c) for c in cluster)
        last = found[-1] if found else None
        covering = [f for f in faces() if all(ord(c) in f.cmap for c in needed)]
        # Stay in the font already in use where it can: a word switches fonts only
        # where it must (Vietnamese "Phở" whole in Noto Sans, not split at "ở").
        face = (
            last.face if last is not None and last.face in covering else next(iter(covering), None)
        )
        if face is None:
            missing += [
                f"U+{ord(c):04X}" for c in needed if all(ord(c) not in f.cmap for f in faces())
            ]
            continue
        if last is not None and (
            (last.face == face and (neutral or last.script == script))
            or (neutral and ord(cluster[0]) in last.face.cmap)
        ):
            found[-1] = Run(last.text + cluster, last.face, last.script)
        else:
            found.append(Run(cluster, face, script))
    if missing:
        raise Unrenderable(
            "the poster fonts have no glyph for " + ", ".join(dict.fromkeys(missing))
        )
    return found


def shape(run: Run, weight: int) -> list[Glyph]:
    """HarfBuzz's glyphs for `run` in font units."""
    font = hb.Font(run.face.hb_face)
    font.set_variations({"wght": float(weight)})
    buffer = hb.Buffer()
    buffer.add_codepoints([ord(c) for c in run.text])  # clusters index code points
    buffer.guess_segment_properties()
    buffer.script = run.script.capitalize()
    if run.script == KHMER:
        buffer.language = LOCALE
    hb.shape(font, buffer, {})
    return [
        Glyph(info.codepoint, info.cluster, pos.x_advance)
        for info, pos in zip(buffer.glyph_infos, buffer.glyph_positions, strict=True)
    ]


@functools.cache
def _dotted_circle(face: Face) -> int | None:
    return face.glyph_id(DOTTED_CIRCLE)


def check_shaped(run: Run, weight: int) -> list[Glyph]:
    """The run's glyphs; Unrenderable if the shaper produced .notdef (glyph 0) or
    inserted a dotted circle the text did not contain."""
    glyphs = shape(run, weight)
    if any(g.glyph_id == 0 for g in glyphs):
        raise Unrenderable("the poster fonts cannot draw part of the text")
    circle = _dotted_circle(run.face)
    if chr(DOTTED_CIRCLE) not in run.text and any(g.glyph_id == circle for g in glyphs):
        bad = sorted({f"U+{ord(run.text[g.cluster]):04X}" for g in glyphs if g.glyph_id == circle})
        raise Unrenderable(
            "the text has a Khmer vowel sign or subscript with no consonant before it "
            f"(at {', '.join(bad)}); correct the spelling"
        )
    return glyphs
