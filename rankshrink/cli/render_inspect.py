"""``inspect``'s output: per Linear layer, its near-parallel pairs and spectrum, and the totals."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from rankshrink.cli.grid import Col, format_shape, grid


def inspect_table(rows: list[dict[str, Any]], tau_cos: float | None = None) -> Table:
    """The ``inspect`` table: per Linear, near-parallel pairs (``1 − |cos| < tau_cos``, named in
    the title) and the most parallel pair among rows of ``[W|b]`` / columns, the effective
    rank, the Marchenko–Pastur rank and the share of its weight an RMT-SVD split keeps. The
    maximum rank is the shape's smaller side; it, and the bulk fraction, are in the JSON."""
    cols = [
        Col("layer", text=True),
        Col("out×in"),
        Col("params"),
        Col("∥ pairs\nrow/col"),
        Col("max |cos|\nrow/col"),
        Col("eff.\nrank"),
        Col("MP\nrank"),
        Col("RMT-SVD\nsize"),
    ]
    cells = [
        [
            r["name"],
            format_shape(r["shape"]),
            f"{r['params']:,}",
            f"{r['parallel_row_pairs']}/{r['parallel_col_pairs']}",
            f"{r['max_row_cos']:.4f}/{r['max_col_cos']:.4f}",
            f"{r['effective_rank']:.1f}",
            # the Marchenko–Pastur reading: singular values above the noise edge, and the
            # layer's weight once split at that rank (SPEC §5), as a share of its weight now
            str(r["mp_rank"]),
            f"{r['mp_params'] / r['params']:.0%}",
        ]
        for r in rows
    ]
    title = "Linear layers" + ("" if tau_cos is None else f" (∥: 1 − |cos| < {tau_cos:g})")
    return grid(title, cols, cells)


def inspect_summary(rows: list[dict[str, Any]]) -> str:
    """The line under the ``inspect`` table: layers, parameters, near-parallel pairs, and what
    an RMT-SVD split at the Marchenko–Pastur rank would keep of the Linear layers' parameters
    (an estimate from the spectra alone, before any fine-tuning)."""
    params = sum(r["params"] for r in rows)
    kept = sum(r["mp_params"] for r in rows)
    pairs = sum(r["parallel_row_pairs"] + r["parallel_col_pairs"] for r in rows)
    share = f" ({kept / params:.0%})" if params else ""
    return (
        f"total: {len(rows)} layers, {params:,} params, {pairs:,} near-parallel pairs;"
        f" RMT-SVD would keep {kept:,}{share}"
    )
