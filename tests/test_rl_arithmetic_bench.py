"""The pieces of ``benchmarks/rl_arithmetic.py`` that decide what it prints, on small inputs.

The benchmark itself (supervised training, RL and three evaluations of the real model: most of
an hour on a CPU) prints its figures when run; these tests check its paired test of the two
evaluations and the checks of its options.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rl_arithmetic  # noqa: E402


def test_mcnemar_exact_p_value_of_the_discordant_problems():
    # 3 became right, 1 wrong: P(X >= 3) for X ~ Binomial(4, 1/2) is 5/16; two-sided 10/16.
    assert rl_arithmetic.mcnemar(3, 1) == "McNemar z = 1.00, exact two-sided p = 0.6250"
    # A one-sided run of 6: 2 * (1/2)**6 = 0.03125.
    assert rl_arithmetic.mcnemar(6, 0) == "McNemar z = 2.45, exact two-sided p = 0.0312"
    # Symmetric: the sign of z follows the direction, the p-value does not.
    assert rl_arithmetic.mcnemar(1, 3) == "McNemar z = -1.00, exact two-sided p = 0.6250"
    # Equal counts: the two-sided p-value is capped at 1.
    assert rl_arithmetic.mcnemar(2, 2).endswith("exact two-sided p = 1.0000")
    assert rl_arithmetic.mcnemar(0, 0) == "McNemar: no discordant problem"


def test_mcnemar_of_a_large_difference_prints_a_small_p_value_in_full():
    # 43 became right, 9 wrong (the documented run): z = 34 / sqrt(52); p = 2 * P(X >= 43).
    p = 2 * sum(math.comb(52, k) for k in range(43, 53)) / 2 ** 52
    assert rl_arithmetic.mcnemar(43, 9) == f"McNemar z = 4.71, exact two-sided p = {p:.1e}"
    assert f"{p:.1e}" == "2.0e-06"


def test_defaults_are_the_documented_run():
    args = rl_arithmetic.parse_args([])
    assert (args.test_size, args.sft_steps, args.rl_steps, args.prompts_per_step,
            args.group_size, args.rl_temperature, args.rl_lr) == (200, 20, 30, 16, 8, 0.7, 3e-4)


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--test-size", "0"], "--test-size must be at least 1"),
    (["--sft-warmup", "-1"], "--sft-warmup must be at least 0"),
    (["--rl-temperature", "0"], "--rl-temperature must be above 0"),
    (["--rl-lr", "nan"], "--rl-lr must be above 0"),
])
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        rl_arithmetic.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
