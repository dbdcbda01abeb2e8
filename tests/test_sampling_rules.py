"""The one rule set of the sampling settings (temperature, top_p, top_k, max_tokens)."""

from __future__ import annotations

import math

import pytest

from tinkerkit.sampling_rules import SAMPLING_SETTINGS, sampling_problems, setting_problem


def test_defaults_and_edges_are_valid():
    assert sampling_problems(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=512) == []
    assert sampling_problems(temperature=1.5, top_p=1e-6, top_k=1, max_tokens=1) == []
    assert sampling_problems(temperature=0.7, top_p=0.9, top_k=50, max_tokens=None) == []


@pytest.mark.parametrize("top_k,problem", [
    (-1, None), (1, None), (40, None),
    (0, "must be -1 (off) or at least 1"),
    (-2, "must be -1 (off) or at least 1"),
])
def test_top_k_is_minus_one_or_positive(top_k, problem):
    assert setting_problem("top_k", top_k) == problem


def test_top_k_zero_is_refused():
    assert sampling_problems(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16) == [
        "top_k = 0: must be -1 (off) or at least 1"]


def test_every_problem_in_argument_order():
    assert sampling_problems(temperature=-1.0, top_p=0.0, top_k=0, max_tokens=0) == [
        "temperature = -1.0: must be a finite number, at least 0 (0 is greedy)",
        "top_p = 0.0: must be in (0, 1] (1 is off)",
        "top_k = 0: must be -1 (off) or at least 1",
        "max_tokens = 0: must be at least 1",
    ]


@pytest.mark.parametrize("name,value", [
    ("temperature", math.inf), ("temperature", math.nan), ("temperature", None),
    ("top_p", 1.01), ("top_p", math.nan), ("top_p", None), ("top_k", None),
])
def test_non_finite_and_missing_values_are_refused(name, value):
    assert setting_problem(name, value) is not None


def test_the_settings_with_a_rule():
    assert SAMPLING_SETTINGS == ("temperature", "top_p", "top_k", "max_tokens")
    with pytest.raises(KeyError):
        setting_problem("seed", 0)
