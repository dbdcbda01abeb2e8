"""The settings of Tinker's built-in losses: which ``loss_fn_config`` keys each loss takes, their
defaults and their ranges. One home for these rules: the local engine (and ``tinkerkit serve``)
resolve a request's ``loss_fn_config`` with :func:`resolve_loss_config`, and ``RL_LOSS_CONFIG``
is checked with it when a config loads, so a bad value is refused the same way in both places
(and, from a config file, named with the file).

Defaults when a key is absent: ``ppo`` ``clip_low_threshold`` 0.8 and ``clip_high_threshold``
1.2 (Tinker's PPO page: epsilon 0.2 on both sides); ``cispo`` 0.0 and 4.0 (Tinker's loss
tutorial, ``tutorials/202_loss_functions.py``: a one-sided clip, after MiniMax-M1 and ScaleRL);
``dro`` ``beta`` 0.05 (the value of Tinker's DRO example; the page states no default). The
formulas that use them are in :mod:`tinkerkit.engines.local.losses`.

Example::

    resolve_loss_config("ppo", {"clip_high_threshold": 1.5})
    # {'clip_low_threshold': 0.8, 'clip_high_threshold': 1.5}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOSS_CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
}
"""Each loss's ``loss_fn_config`` keys with their defaults, by Tinker's ``loss_fn`` name."""


def resolve_loss_config(loss_fn: str, loss_fn_config: Mapping[str, object] | None
                        ) -> dict[str, float]:
    """``loss_fn_config`` for the loss ``loss_fn`` with the defaults filled in.

    Args:
        loss_fn: A key of :data:`LOSS_CONFIG_DEFAULTS`.
        loss_fn_config: The keys given (str -> number), or None.

    Returns:
        Every key the loss takes, as a float.

    Raises:
        KeyError: ``loss_fn`` is not one of Tinker's losses (callers name their own choices).
        ValueError: A key the loss does not take, a value that is not a finite number, a
            negative or inverted clip range (``clip_low_threshold`` must lie in
            ``[0, clip_high_threshold]``), or a negative ``beta``; the message is one line.
    """
    config = dict(LOSS_CONFIG_DEFAULTS[loss_fn])
    for key, value in (loss_fn_config or {}).items():
        if key not in config:
            accepted = ", ".join(LOSS_CONFIG_DEFAULTS[loss_fn]) or "none"
            raise ValueError(f"loss_fn_config key '{key}' is not used by {loss_fn} "
                             f"(keys it takes: {accepted})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"loss_fn_config['{key}']={value!r} must be a finite number")
        config[key] = float(value)
    if "clip_low_threshold" in config:
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        if not 0 <= low <= high:
            raise ValueError(f"{loss_fn}: clip_low_threshold={low} and clip_high_threshold="
                             f"{high} must satisfy 0 <= low <= high")
    if config.get("beta", 0.0) < 0:
        raise ValueError(f"{loss_fn}: beta={config['beta']} must be >= 0")
    return config
