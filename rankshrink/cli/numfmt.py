"""Numbers as the terminal and the plots show them: one place that decides how a value that
rounds to zero looks, so that no table prints ``-0.00`` (the sign of a float error, not of a
change) and a signed column always reads ``+0.00`` for "no change"."""

from __future__ import annotations


def num(value: float, spec: str = ".2f") -> str:
    """``format(value, spec)`` without a minus sign on a value that rounds to zero.

    Args:
        value: the number.
        spec: a format spec for a float (``".2f"``, ``"+.2f"``, ``".1%"``, ``".3g"``, ``".2e"``).
            With a ``+`` in it, a value that rounds to zero reads ``+0.00``.

    Returns:
        ``"0.00"`` (or ``"+0.00"``) where plain formatting gives ``"-0.00"``; otherwise the
        plain formatting.
    """
    text = format(value, spec)
    if text[:1] != "-" or not _rounds_to_zero(text):
        return text
    return ("+" if "+" in spec else "") + text[1:]


def _rounds_to_zero(text: str) -> bool:
    """Whether the shown digits of a formatted float are all zero (the exponent aside)."""
    mantissa = text.lower().split("e")[0]
    return not any(c in "123456789" for c in mantissa) and any(c == "0" for c in mantissa)
