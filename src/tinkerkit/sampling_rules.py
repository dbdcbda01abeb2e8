"""The valid values of the sampling settings, for every caller that checks them.

One rule per setting of ``tinker.types.SamplingParams`` that tinkerkit checks. The rules follow
what the Tinker SDK documents, so that a setting accepted here is meaningful on the hosted service
as on the local engine:

- ``temperature``: a finite number, at least 0; 0 is greedy (argmax).
- ``top_p``: in (0, 1]; 1 is off.
- ``top_k``: -1 (off: the SDK's "-1 for no limit") or at least 1. 0 is refused: the SDK gives it
  no meaning, and sampling among zero tokens has none.
- ``max_tokens``: at least 1, or None for the sampler's default.

Callers raise their own error type with the problems joined; for example::

    problems = sampling_problems(temperature=0.7, top_p=1.0, top_k=0, max_tokens=512)
    # ["top_k = 0: must be -1 (off) or at least 1"]
    if problems:
        raise ConfigError("; ".join(problems))

No third-party imports: the configuration, evaluation and the engines all import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["SAMPLING_SETTINGS", "rule_of", "sampling_problems", "setting_problem"]

_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda value: math.isfinite(value) and value >= 0,
                    "must be a finite number, at least 0 (0 is greedy)"),
    "top_p": (lambda value: 0 < value <= 1, "must be in (0, 1] (1 is off)"),
    "top_k": (lambda value: value == -1 or value >= 1, "must be -1 (off) or at least 1"),
    "max_tokens": (lambda value: value is None or value >= 1, "must be at least 1"),
}

SAMPLING_SETTINGS = tuple(_RULES)
"""The names of the settings that have a rule here."""


def rule_of(name: str) -> str:
    """The rule of one sampling setting, in words (``"must be in (0, 1] (1 is off)"``).

    Raises:
        KeyError: ``name`` is not one of :data:`SAMPLING_SETTINGS`.
    """
    return _RULES[name][1]


def setting_problem(name: str, value: float | int | None) -> str | None:
    """The rule that one sampling setting breaks.

    Args:
        name: One of :data:`SAMPLING_SETTINGS`.
        value: The setting's value.

    Returns:
        The rule it breaks (``"must be -1 (off) or at least 1"``), or None when it is valid.

    Raises:
        KeyError: ``name`` is not one of :data:`SAMPLING_SETTINGS`.
    """
    is_valid, rule = _RULES[name]
    if name != "max_tokens" and value is None:
        return rule
    return None if is_valid(value) else rule


def sampling_problems(temperature: float, top_p: float, top_k: int,
                      max_tokens: int | None) -> list[str]:
    """Every rule that a set of sampling settings breaks.

    Args:
        temperature: Sampling temperature.
        top_p: Nucleus sampling probability mass.
        top_k: Number of most likely tokens sampled among.
        max_tokens: Most tokens generated, or None for the sampler's default.

    Returns:
        One ``"<name> = <value>: <rule>"`` string per invalid setting, in the order of the
        arguments (``["top_k = 0: must be -1 (off) or at least 1"]``); empty when all are valid.
    """
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "max_tokens": max_tokens}
    return [f"{name} = {value!r}: {problem}" for name, value in values.items()
            if (problem := setting_problem(name, value)) is not None]
