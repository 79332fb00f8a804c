"""The grammar of the built-in ``shapes`` captions, both ways: ``parse_caption`` reads the shapes and background
a caption states (``ldm.metrics.alignment`` compares them with what it detects); ``format_caption`` writes one, as
``ldm.data.shapes.scene_caption`` does."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.data.common import article
from ldm.data.shapes import BACKGROUNDS, COLORS, PHRASES, SHAPES, SIZES


@dataclass(frozen=True)
class ShapeSpec:
    """One shape as a caption states it: kind, colour name, "small"/"large", cell name (e.g. "top left")."""

    kind: str
    color: str
    size: str
    position: str


_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in PHRASES.items()}
_ITEM = re.compile(r"(a|an) ({}) ({}) ({}) ({})".format(
    "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES), "|".join(map(re.escape, PHRASES.values()))))
_TAIL = re.compile(r"(.+), on (a|an) ({}) background".format("|".join(BACKGROUNDS)))


def _spec_phrase(spec: ShapeSpec) -> str:
    return f"{article(f'{spec.size} {spec.color} {spec.kind}')} {PHRASES[spec.position]}"


def format_caption(shapes: Sequence[ShapeSpec], background: str) -> str:
    """The caption of ``shapes`` (in the given order) on ``background``: the inverse of ``parse_caption``."""
    if not shapes:
        raise ValueError("a caption needs at least one shape")
    parts = [_spec_phrase(s) for s in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on {article(background)} background"


def parse_caption(caption: str) -> tuple[list[ShapeSpec], str]:
    """Shapes (in caption order) and background colour of a ``shapes`` caption (``scene_caption``'s grammar).

    Case and surrounding whitespace are ignored, as is one trailing period. Raises ``ValueError`` naming the
    caption if it does not follow the grammar exactly (articles included) or names one cell twice.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.strip().lower().removesuffix(".")
    tail = _TAIL.fullmatch(text)

    def fail(why: str) -> ValueError:
        return ValueError(f"caption {caption!r} does not follow the shapes grammar ({why}); expected e.g. "
                          f"'a small red circle on the left and a large blue square on the right, "
                          f"on a gray background'")

    if tail is None:
        raise fail("no ', on a <colour> background' ending")
    listed, background = tail.group(1), tail.group(3)
    head, sep, last = listed.rpartition(" and ")
    parts = (head.split(", ") + [last]) if sep else [listed]
    specs = []
    for part in parts:
        m = _ITEM.fullmatch(part)
        if m is None:
            raise fail(f"cannot read {part!r} as '<a|an> <size> <colour> <kind> <position>'")
        specs.append(ShapeSpec(kind=m.group(4), color=m.group(3), size=m.group(2),
                               position=_PHRASE_TO_POSITION[m.group(5)]))
    if format_caption(specs, background) != text:  # enforces the articles and the ", ... and ..." joining
        raise fail("wrong article or list punctuation")
    seen = Counter(s.position for s in specs)
    if max(seen.values()) > 1:
        raise fail(f"cell {seen.most_common(1)[0][0]!r} named twice; one shape per cell")
    return specs, background
