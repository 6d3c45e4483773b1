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
    """Accuracy (or top-1 agreement) against ONNX bytes, one curve per method; the original is a
    star. ``rows`` are :func:`rankshrink.compare.compare` rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "agreement"
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "original"))
    for method in methods:
        pts = sorted(
            (r["onnx_bytes"], r[metric]) for r in rows if r["method"] == method and r.get(metric)
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot([x / 1024 for x in xs], ys, marker="o", label=method)
    base = next((r for r in rows if r["method"] == "original"), None)
    if base is not None and base.get(metric) is not None:
        ax.plot([base["onnx_bytes"] / 1024], [base[metric]], "k*", markersize=12, label="original")
    ax.set_xlabel("ONNX size (KiB)")
    ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "top-1 agreement")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)
