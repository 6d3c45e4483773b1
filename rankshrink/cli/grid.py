"""Table layout for the terminal: every table rankshrink prints is built by :func:`grid`.

Every table fits :data:`WIDTH` columns without cutting a number or a shape: headers are short
and break over two lines, columns that would only repeat another or the JSON report are left
to the JSON, and the one column of names (layers, methods) takes the room the numbers leave and
breaks after ``.``, ``+``, ``(`` or ``-`` (:func:`grid`). Nothing is ever cut with ``…``: a
console narrower than that folds cells onto more lines instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

#: The width every table is laid out for (the CLI's console width off a terminal, too).
WIDTH = 100

#: A name column is never made narrower than this; below it, rich folds it further.
_MIN_NAME = 12

#: Characters a name may break after (``layers.0.attn.q``, ``kept+factored``, ``indexed(…)``).
_BREAKS = ".+(-"


@dataclass(frozen=True)
class Col:
    """A column of :func:`grid`: its header (``\\n`` breaks it) and whether it holds text."""

    header: str
    text: bool = False


def grid(
    title: str,
    cols: Sequence[Col],
    rows: Sequence[Sequence[str | Text]],
    *,
    names: int = 0,
    caption: str | None = None,
    width: int = WIDTH,
) -> Table:
    """A table of already formatted cells that fits ``width`` columns.

    Column ``names`` gets the room the other columns leave (at least :data:`_MIN_NAME`) and its
    cells break after :data:`_BREAKS`; every other cell keeps its natural width. Numbers are
    right-aligned. No column cuts with an ellipsis: on a narrower console rich folds cells.
    """
    cells = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    natural = [
        max([_cell_width(Text(col.header))] + [_cell_width(row[i]) for row in cells])
        for i, col in enumerate(cols)
    ]
    border = 3 * len(cols) + 1  # "│ " before each cell, " │" after the last
    room = width - border - sum(w for i, w in enumerate(natural) if i != names)
    name_width = max(_MIN_NAME, room)
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(cols):
        header = break_name(col.header, name_width) if i == names else col.header
        table.add_column(header, justify="left" if col.text else "right", overflow="fold")
    for row in cells:
        row[names] = Text(break_name(row[names].plain, name_width), style=row[names].style)
        table.add_row(*row)
    return table


def _cell_width(text: Text) -> int:
    return max((line.cell_len for line in text.split("\n")), default=0)


def break_name(name: str, width: int) -> str:
    """``name`` in lines of at most ``width`` cells, broken after :data:`_BREAKS` where possible
    (``encoder.layers.11.`` / ``attention.output.dense``), folded only where a piece is longer."""
    pieces, piece = [], ""
    for ch in name:
        piece += ch
        if ch in _BREAKS:
            pieces.append(piece)
            piece = ""
    pieces += [piece] if piece else []
    lines = [""]
    for p in pieces:
        if len(lines[-1]) + len(p) <= width:
            lines[-1] += p
            continue
        while len(p) > width:  # a piece longer than a line: fold it
            lines.append(p[:width])
            p = p[width:]
        lines.append(p)
    return "\n".join(line for line in lines if line)


def format_shape(shape: Sequence[int]) -> str:
    """``64×32``."""
    return "×".join(map(str, shape))
