"""How the commands print counts and metrics for people."""

from __future__ import annotations

import math


def plural(count: int, noun: str) -> str:
    """"1 vertex", "2 vertices", "1,024 faces": `count` and `noun` (singular; "-ex" -> "-ices", else + "s")."""
    if count != 1:
        noun = noun[:-2] + "ices" if noun.endswith("ex") else noun + "s"
    return f"{count:,} {noun}"


def number(x: float) -> str:
    """A metric for people: 4 decimals in [1e-3, 1e6) (and 0), else 4 significant digits in scientific notation
    (a 1e30-scaled mesh must not print a 65-digit Chamfer)."""
    if math.isfinite(x) and (x == 0 or 1e-3 <= abs(x) < 1e6):
        return f"{x:.4f}"
    return f"{x:.4e}"
