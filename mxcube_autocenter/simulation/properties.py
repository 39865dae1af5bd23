"""The virtual beamline's XML properties, read with a check that names the object, the property and the fix.

A value mxcubecore cannot convert ("180 deg/s") otherwise fails as a bare
``ValueError`` or ``KeyError`` in the object's init, and mxcubecore then
leaves the object out: the failure shows later, as a motor or detector that
is not there.
"""

from __future__ import annotations

import math


def number(ho, name: str, default, *, low: float = -math.inf, high: float = math.inf, whole: bool = False,
           unit: str = ""):  # fmt: skip
    """The number property ``name`` of hardware object ``ho`` (``default`` if absent), within ``low``-``high``.

    Raises
    ------
    ValueError
        If it is no number (no whole number with ``whole``), or lies outside
        the range; the message names ``ho``'s XML file, the property and the range.
    """
    value = ho.get_property(name, default)
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        parsed = math.nan
    if not (math.isfinite(parsed) and low <= parsed <= high) or (whole and not parsed.is_integer()):
        what = "a whole number" if whole else "a number"
        limits = [f"from {low:g}" if math.isfinite(low) else "", f"to {high:g}" if math.isfinite(high) else ""]
        wanted = " ".join([what, *filter(None, limits), unit]).strip()
        raise ValueError(f"{ho.load_name}: {name} = {value!r}: give {wanted} in its XML file")
    return int(parsed) if whole else parsed


def choice(ho, name: str, default: str, choices) -> str:
    """The property ``name`` of hardware object ``ho`` (``default`` if absent), one of ``choices``.

    Raises
    ------
    ValueError
        If it is none of them; the message names ``ho``'s XML file, the
        property and the choices.
    """
    value = str(ho.get_property(name, default))
    if value not in choices:
        raise ValueError(f"{ho.load_name}: {name} = {value!r}: give one of {', '.join(choices)} in its XML file")
    return value
