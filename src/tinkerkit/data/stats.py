"""Length statistics (characters or tokens) and their table, shared by ``split`` and rendering.

Example::

    stats = length_stats([1, 2, 3, 4, 100])   # max 100, mean 22.0, median 3.0, p95 80.8
    Console().print(stats_table("Lengths (characters)", {"prompt": stats}))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.table import Table


@dataclass(frozen=True)
class LengthStats:
    """Summary of a list of lengths; all zeros when the list is empty.

    Attributes:
        count: How many lengths.
        max: The longest.
        mean: The arithmetic mean.
        median: The 50th percentile (mean of the two middle values for an even count).
        p95: The 95th percentile, linearly interpolated between the closest ranks.
        min: The shortest.
    """

    count: int
    max: int
    mean: float
    median: float
    p95: float
    min: int


def length_stats(lengths: Sequence[int]) -> LengthStats:
    """Count, min, max, mean, median and 95th percentile of ``lengths``.

    Percentiles use linear interpolation between closest ranks (``numpy.percentile``'s default
    method ``"linear"``, Hyndman & Fan 1996 definition 7): for ``[1, 2, 3, 4, 100]`` p95 is
    ``4 + 0.8 * (100 - 4) = 80.8``.

    Args:
        lengths: Non-negative lengths (characters, tokens, ...); may be empty.

    Returns:
        The statistics; ``count == 0`` and zeros everywhere for an empty input.
    """
    if len(lengths) == 0:
        return LengthStats(count=0, max=0, mean=0.0, median=0.0, p95=0.0, min=0)
    values = np.asarray(lengths, dtype=np.float64)
    return LengthStats(count=len(values), max=int(values.max()), mean=float(values.mean()),
                       median=float(np.median(values)), p95=float(np.percentile(values, 95)),
                       min=int(values.min()))


def stats_table(title: str, rows: dict[str, LengthStats]) -> Table:
    """A rich table, one row per named :class:`LengthStats`: count, min, mean, median, p95, max.

    Args:
        title: The table title, e.g. ``"Lengths (tokens)"``.
        rows: Row label -> statistics, in display order.

    Returns:
        The table, ready for ``Console.print``.
    """
    table = Table(title=title)
    table.add_column("")
    for column in ("count", "min", "mean", "median", "p95", "max"):
        table.add_column(column, justify="right")
    for label, s in rows.items():
        table.add_row(label, f"{s.count:,}", f"{s.min:,}", f"{s.mean:,.1f}", f"{s.median:,.1f}",
                      f"{s.p95:,.1f}", f"{s.max:,}")
    return table
