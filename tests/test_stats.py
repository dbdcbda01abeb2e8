"""Length statistics: known percentile values and the rendered table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tinkerkit.data.stats import LengthStats, length_stats, stats_table


def test_length_stats_known_values():
    stats = length_stats([1, 2, 3, 4, 100])
    assert (stats.count, stats.min, stats.max) == (5, 1, 100)
    assert stats.mean == 22.0
    assert stats.median == 3.0
    assert stats.p95 == pytest.approx(80.8)  # 4 + 0.8 * (100 - 4), linear interpolation


def test_length_stats_even_count_and_order():
    stats = length_stats([4, 1, 3, 2])
    assert stats.median == 2.5
    assert stats.p95 == pytest.approx(3.85)  # rank 0.95 * 3 = 2.85 -> 3 + 0.85 * (4 - 3)


def test_length_stats_empty_and_single():
    assert length_stats([]) == LengthStats(count=0, max=0, mean=0.0, median=0.0, p95=0.0, min=0)
    assert length_stats([7]) == LengthStats(count=1, max=7, mean=7.0, median=7.0, p95=7.0, min=7)


def test_stats_table_renders_values():
    console = Console(file=io.StringIO(), width=120)
    console.print(stats_table("Lengths (tokens)", {"prompt": length_stats([1, 2, 3, 4, 100]),
                                                   "total": length_stats([1200, 3400])}))
    text = console.file.getvalue()
    assert "Lengths (tokens)" in text
    prompt_row = next(line for line in text.splitlines() if "prompt" in line)
    cells = [cell.strip() for cell in prompt_row.split("│")[1:-1]]
    assert cells == ["prompt", "5", "1", "22.0", "3.0", "80.8", "100"]
    assert "3,400" in text
