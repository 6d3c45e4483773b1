"""PNG plots with matplotlib (presentation layer): a run's trajectory and a method comparison.

Both return the PNG bytes, so the CLI writes them atomically with its other outputs. matplotlib
is imported lazily with the Agg backend (no display needed, nothing opens a window).
"""

from __future__ import annotations

import io
from typing import Any

from rankshrink.errors import InputError


def require_matplotlib() -> None:
    """Fail early (exit 2, before any training) when ``--plot`` cannot be honoured.

    Raises:
        InputError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib)"
        ) from None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a GUI backend
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def trajectory_png(report: dict[str, Any]) -> bytes:
    """Export-size ratio (left axis) and loss (right axis) over the fine-tuning steps, like the
    RaRe paper's Figure 4a, from ``report["training"]["history"]``."""
    plt = _pyplot()
    history = report["training"]["history"]
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h.get("size_ratio", float("nan")) for h in history], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("ONNX size / original", color="tab:blue")
    ax.set_ylim(0, 1.05)
    loss_ax = ax.twinx()
    loss_ax.plot(steps, [h["loss"] for h in history], color="tab:red", alpha=0.6, linewidth=0.8)
    loss_ax.set_ylabel("training loss", color="tab:red")
    ver = report["verification"]
    acc = ""
    if ver.get("accuracy_after") is not None:
        acc = f", accuracy {ver['accuracy_before']:.2f} → {ver['accuracy_after']:.2f} %"
    ax.set_title(
        f"{report['method']}: final size {report['onnx_ratio']:.3f} of the original{acc}",
        fontsize=10,
    )
    fig.tight_layout()
    return _png(fig)


def compare_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """:func:`compare_figure` as PNG bytes."""
    return _png(compare_figure(rows, title))


def compare_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Test accuracy (or top-1 agreement with the original) in percent against ONNX size, one
    curve per method. The original is a star and a horizontal line, with a band of ± one
    held-out sample (100/n points: the smallest change the test split can show) around it,
    so that a difference inside the band reads as the noise it is. ``rows`` are
    :func:`rankshrink.pipeline.compare.compare` rows; the axis is :func:`accuracy_limits`'."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "agreement"
    scale = 1.0 if metric == "accuracy" else 100.0  # agreement is a fraction in the rows
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "original"))
    values: list[float] = []
    for method in methods:
        pts = sorted(
            (r["onnx_bytes"], r[metric] * scale)
            for r in rows
            if r["method"] == method and r.get(metric) is not None
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            values += ys
            ax.plot([x / 1024 for x in xs], ys, marker="o", label=method)
    base = next((r for r in rows if r["method"] == "original"), None)
    original = None if base is None or base.get(metric) is None else base[metric] * scale
    samples = None if base is None else base.get("samples")
    if original is not None:
        if samples:
            one = 100 / samples
            ax.axhspan(
                original - one,
                original + one,
                color="0.85",
                zorder=0,
                label=f"original ± 1 of {samples} held-out samples ({one:.2f} pt)",
            )
        ax.axhline(original, color="k", linewidth=0.8, linestyle="--", zorder=1)
        ax.plot(
            [base["onnx_bytes"] / 1024],
            [original],
            "k*",
            markersize=12,
            label=f"original ({original:.2f} %)",
        )
    ax.set_ylim(*accuracy_limits(values, original, samples))
    ax.set_xlabel("ONNX size (KiB)")
    name = "test accuracy" if metric == "accuracy" else "top-1 agreement with the original"
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_limits(
    values: list[float], original: float | None, samples: int | None = None
) -> tuple[float, float]:
    """The accuracy axis (percent) of :func:`compare_figure`: from the original minus 5 points,
    or lower to show the lowest point, to a little above the highest, within 0–100 plus a
    margin. A narrower axis makes one held-out sample (``100/samples`` points) look like a
    cliff.

    Args:
        values: the plotted accuracies, in percent.
        original: the original model's accuracy, in percent, or None.
        samples: the number of held-out samples, or None.
    """
    pad = max(0.5, 100 / samples if samples else 0.0)
    shown = [*values, *([] if original is None else [original])]
    if not shown:
        return 0.0, 100.0 + pad
    low = min(shown) - pad
    if original is not None:
        low = min(low, original - 5)
    return max(0.0, low), min(max(shown), 100.0) + pad
