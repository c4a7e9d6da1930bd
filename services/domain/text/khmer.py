"""Where Khmer text may be cut: grapheme clusters (ICU), never splitting a stack.

A coeng (U+17D2) puts the next consonant below the one before; cutting between
them leaves a dangling sign and a consonant out of place. Unicode's cluster rules
for Khmer have changed across versions, so clusters are joined wherever one would
end in a coeng, whatever ICU's version says. Posters break lines here as a last
resort; SMS messages shorten venue names here.
"""

from __future__ import annotations

from icu4py.breakers import CharacterBreaker

COENG = "\u17d2"
LOCALE = "km"


def grapheme_clusters(text: str) -> list[str]:
    """Extended grapheme clusters (UAX #29, from ICU)."""
    return list(CharacterBreaker(text, LOCALE)) if text else []


def syllables(text: str) -> list[str]:
    """Units text may be cut between: grapheme clusters, joined where one would end
    in a coeng (ស + ្ + ត is one stack)."""
    out: list[str] = []
    for cluster in grapheme_clusters(text):
        if out and out[-1].endswith(COENG):
            out[-1] += cluster
        else:
            out.append(cluster)
    return out
