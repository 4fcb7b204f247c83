"""Text for sheets and plots: Pillow's bundled default font, word wrapping, measured line heights.

Nothing here needs a font file: ``ImageFont.load_default(size=...)`` is a scalable font bundled with
Pillow >= 10.1 (when Pillow has FreeType); older Pillows get their fixed-size bitmap font, which is
smaller but draws the same words in the same places.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

Font = Any  # ImageFont.FreeTypeFont or ImageFont.ImageFont
Color = tuple[int, int, int]

TEXT: Color = (0, 0, 0)
MUTED: Color = (70, 70, 70)
BACKGROUND: Color = (255, 255, 255)

# A 1 x 1 canvas to measure text on: ImageDraw.textbbox / textlength exist from Pillow 8.0 for both
# font kinds, unlike ImageFont.getbbox (bitmap fonts from 9.2) or getmetrics (FreeType only).
_MEASURE = ImageDraw.Draw(Image.new("L", (1, 1)))


@functools.lru_cache(maxsize=16)
def font(size: int) -> Font:
    """Pillow's default font at ``size`` pixels, or its fixed bitmap font when it cannot scale."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        # TypeError: Pillow < 10.1 has no size argument; the others: Pillow built without FreeType.
        return ImageFont.load_default()


def text_width(text: str, fnt: Font) -> int:
    """Advance width of one line of ``text`` in pixels (rounded up)."""
    return math.ceil(_MEASURE.textlength(text, font=fnt))


@functools.lru_cache(maxsize=16)
def _line_height(fnt: Font) -> int:
    # Tallest ascender to lowest descender of Latin text, plus a quarter of it as leading.
    bottom = _MEASURE.textbbox((0, 0), "ÅÉbdfhklgjpqy|", font=fnt)[3]
    return bottom + max(2, bottom // 4)


def line_height(fnt: Font) -> int:
    """Vertical distance between the tops of consecutive lines of ``fnt``."""
    return _line_height(fnt)


def wrap(text: str, fnt: Font, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` pixels; every character is kept.

    Lines break at spaces (greedy: as many words per line as fit) and at the newlines already in
    ``text``. A word wider than ``width`` on its own is split between characters. Nothing is ever
    truncated: a longer text gives more lines.
    """
    width = max(1, int(width))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = word if not current else f"{current} {word}"
            if text_width(candidate, fnt) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            # The word starts a new line; split it if even alone it is too wide.
            while text_width(word, fnt) > width and len(word) > 1:
                cut = _longest_prefix(word, fnt, width)
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        lines.append(current)
    return lines


def _longest_prefix(word: str, fnt: Font, width: int) -> int:
    """Length of the longest prefix of ``word`` that fits in ``width`` (at least 1 character)."""
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(word[:mid], fnt) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def draw_lines(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    lines: Sequence[str],
    fnt: Font,
    *,
    fill: Color = TEXT,
    width: int | None = None,
    align: str = "left",
) -> int:
    """Draw ``lines`` top-down from ``xy``; returns the y just below the last line.

    With ``width`` and ``align="center"`` (or ``"right"``) each line is placed within
    ``[x, x + width)``.
    """
    x, y = xy
    step = line_height(fnt)
    for line in lines:
        offset = 0
        if width is not None and align != "left":
            free = max(0, width - text_width(line, fnt))
            offset = free // 2 if align == "center" else free
        draw.text((x + offset, y), line, font=fnt, fill=fill)
        y += step
    return y


def block_height(lines: Sequence[str], fnt: Font) -> int:
    """Height of ``lines`` drawn by ``draw_lines``."""
    return len(lines) * line_height(fnt)


def format_value(value: float) -> str:
    """A compact number for axis ticks and colour-bar ends: 3 significant digits, no ``e+00``."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        decimals = max(0, 2 - math.floor(math.log10(magnitude)))
        text = f"{value:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:.2g}"
