"""Step planning and the learning-rate schedule: pure functions of the step number.

Which examples step N trains on, its learning rate and its AdamW settings depend on ``(SEED, N)``
and the config alone, never on the steps before it: that is what makes a resumed run see the same
batches in the same order as an uninterrupted one. ``step`` is 0-based in the arguments of
:func:`learning_rate_at` and :func:`batch_indices` and 1-based in :func:`is_due` (as logged).
"""

from __future__ import annotations

import math

import numpy as np
import tinker

from tinkerkit.config import LRSchedule, TrainConfig
from tinkerkit.errors import ConfigError


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then constant,
    linear decay to 0, or cosine decay to 0 (Loshchilov & Hutter, arXiv 1608.03983, eq. 5, one
    cycle, no restarts) over the remaining steps.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.lr_schedule == LRSchedule.CONSTANT:
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.lr_schedule == LRSchedule.LINEAR:
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch; the last batch of an epoch may be smaller."""
    return math.ceil(n_examples / batch_size)


def batch_indices(step: int, n_examples: int, batch_size: int, seed: int) -> tuple[int, list[int]]:
    """The epoch (0-based) and example indices of optimizer step ``step`` (0-based).

    Each epoch is a fresh permutation drawn from ``numpy.random.default_rng([seed, epoch])``, so any
    step's batch is known without replaying the ones before it.
    """
    per_epoch = batches_per_epoch(n_examples, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return epoch, order[index * batch_size:(index + 1) * batch_size].tolist()


def plan_steps(n_examples: int, config: TrainConfig, batch_size: int | None = None,
               setting: str = "BATCH_SIZE") -> tuple[int, int]:
    """Optimizer steps per epoch and in total (``MAX_STEPS`` caps ``NUM_EPOCHS`` epochs).

    Args:
        n_examples: Training examples (for ``tinkerkit rl``: prompts).
        config: ``NUM_EPOCHS``, ``MAX_STEPS`` and, by default, ``BATCH_SIZE``.
        batch_size: Examples per step when not ``BATCH_SIZE`` (``RL_PROMPTS_PER_STEP``).
        setting: The name of that setting, for the error.

    Raises:
        ConfigError: The batch is larger than the number of examples.
    """
    batch_size = batch_size or config.batch_size
    if batch_size > n_examples:
        raise ConfigError(f"{setting}={batch_size} is larger than the {n_examples} "
                          f"training examples of {', '.join(config.data_files)}; lower it or "
                          "add data")
    per_epoch = batches_per_epoch(n_examples, batch_size)
    all_epochs = per_epoch * config.num_epochs
    return per_epoch, min(config.max_steps or all_epochs, all_epochs)


def is_due(step: int, every: int, total_steps: int) -> bool:
    """Whether an every-N-steps action runs after step ``step`` (1-based): every N-th step and
    the last one; never when N is 0."""
    return every > 0 and (step % every == 0 or step == total_steps)


def adam_params(config: TrainConfig, lr: float) -> tinker.types.AdamParams:
    """The AdamW hyperparameters of one step."""
    return tinker.types.AdamParams(learning_rate=lr, beta1=config.adam_beta1,
                                   beta2=config.adam_beta2, eps=config.adam_eps,
                                   weight_decay=config.weight_decay,
                                   grad_clip_norm=config.grad_clip_norm)
