"""The training examples: loading ``DATA_FILES``, rendering, the length guards, batch weights.

Guards run here, before the model is loaded: too many examples longer than
``MAX_SEQUENCE_LENGTH`` warn (or stop, with ``STRICT``), and examples longer than the positions
the base model was trained for warn.

Loss normalization (:func:`normalize_batch`): each example's weights are divided by the number of
weighted tokens in the whole step, so the engine's summed loss (Tinker's cross_entropy,
``sum(weights * -logprob)``) is the mean negative log-likelihood per weighted token of the step —
not a mean of per-example means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tinker
from rich.console import Console

from tinkerkit.config import TrainConfig
from tinkerkit.data.conversation import Conversation
from tinkerkit.data.formats import load_conversations
from tinkerkit.data.split import split_conversations
from tinkerkit.errors import ConfigError, DataError
from tinkerkit.models import max_positions
from tinkerkit.render import (
    RenderedExample,
    Renderer,
    RenderStats,
    print_render_stats,
    render_stats_dict,
)

LENGTH_ROUNDING = 64
"""Suggested ``MAX_SEQUENCE_LENGTH`` values are rounded up to a multiple of this many tokens."""


def split_data(config: TrainConfig
               ) -> tuple[list[Conversation], list[Conversation], list[tuple[str, str]]]:
    """Load ``DATA_FILES``; with ``EVAL_SPLIT_RATIO``, hold part of them out.

    The hold-out follows :func:`tinkerkit.data.split.split_conversations` with ``SEED``: records
    with the same prompt stay on one side, and the same files and seed give the same split.

    Returns:
        The training conversations, the held-out ones (empty without ``EVAL_SPLIT_RATIO``), and
        the records the loader skipped (``(where, reason)``).

    Raises:
        ConfigError: ``DATA_FILES`` is empty.
        DataError: A file cannot be read (or a record is bad with ``ON_ERROR=raise``).
    """
    if not config.data_files:
        raise ConfigError("DATA_FILES is empty: name at least one training file")
    loaded = load_conversations(config.data_files, format=config.data_format,
                                on_error=config.on_error)
    if config.eval_split_ratio is None:
        return loaded.conversations, [], loaded.skipped
    train_set, held_out = split_conversations(loaded.conversations, config.eval_split_ratio,
                                              None, config.seed, config.data_files)
    return train_set, held_out, loaded.skipped


def make_renderer(config: TrainConfig, tokenizer) -> Renderer:
    """The training renderer of ``config`` (chat template, TRAIN_ON, length policy)."""
    return Renderer(tokenizer, config.train_on, config.max_sequence_length,
                    config.truncate_long_sequences)


def normalize_batch(examples: Sequence[RenderedExample]) -> tuple[list[tinker.types.Datum], int, int]:
    """Scale weights by 1 / (weighted tokens in the whole batch).

    Args:
        examples: The rendered examples of one step (or of a whole held-out set).

    Returns:
        The datums with scaled float32 weights (the sum of ``weights * -logprob`` over all of them
        is the mean NLL per weighted token), the number of weighted tokens, and the number of
        tokens.
    """
    weighted = sum(e.n_weighted for e in examples)
    datums = []
    for example in examples:
        inputs = example.datum.loss_fn_inputs
        weights = inputs["weights"].to_numpy().astype(np.float32) / weighted
        datums.append(tinker.types.Datum(
            model_input=example.datum.model_input,
            loss_fn_inputs={"target_tokens": inputs["target_tokens"],
                            "weights": tinker.types.TensorData.from_numpy(weights)}))
    return datums, weighted, sum(e.n_tokens for e in examples)


def load_examples(config: TrainConfig, tokenizer, console: Console) -> list[RenderedExample]:
    """Load, normalize and render the training data, printing the statistics and the guard.

    Raises:
        DataError: No example survives rendering (or a record is bad with ``ON_ERROR=raise``).
        ConfigError: ``STRICT`` and more than ``TRUNCATION_WARN_RATIO`` of the examples exceed
            ``MAX_SEQUENCE_LENGTH``.
    """
    conversations, _, skipped = split_data(config)
    examples, stats = make_renderer(config, tokenizer).render_dataset(conversations)
    print_render_stats(stats, console, config.max_sequence_length, skipped_records=skipped)
    if config.on_error == "raise" and stats.failed:
        source, reason = stats.failures[0]
        raise DataError(f"{reason} (set ON_ERROR=skip to skip such records)", path=source,
                        field="messages")
    warning = truncation_warning(stats, config.max_sequence_length, config.truncation_warn_ratio)
    if warning and config.strict:
        raise ConfigError(f"{warning} (STRICT: stopped before training)")
    if warning:
        console.print(f"[yellow]Warning: {warning}[/yellow]")
    positions = positions_warning(examples, config.base_model)
    if positions:
        console.print(f"[yellow]Warning: {positions}[/yellow]")
    if not examples:
        where, reason = stats.reasons[0]
        over = render_stats_dict(stats, config.max_sequence_length)["over_max_length"]
        raise DataError(f"no training example left after rendering: {stats.skipped} skipped and "
                        f"{stats.failed} failed of {stats.total}, {over} longer than "
                        f"MAX_SEQUENCE_LENGTH={config.max_sequence_length} (first: {where}: "
                        f"{reason})", path=", ".join(config.data_files))
    return examples


def length_covering(lengths: Sequence[int], fraction: float = 0.95,
                    multiple: int = LENGTH_ROUNDING) -> int:
    """The smallest multiple of ``multiple`` that is at least the ``fraction`` quantile of lengths.

    The quantile is the nearest-rank one (the ``ceil(fraction * n)``-th smallest length), so at
    least ``fraction`` of the examples are no longer than the returned value.
    """
    ordered = sorted(lengths)
    quantile = ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]
    return max(math.ceil(quantile / multiple), 1) * multiple


def truncation_warning(stats: RenderStats, max_length: int, threshold: float) -> str | None:
    """A message when more than ``threshold`` of the examples exceed ``max_length``, else None.

    The fraction is (examples longer than ``max_length``) / (all examples, failed ones
    included): the truncated ones, those skipped because truncation cut their whole answer, and,
    with truncation off, those skipped for their length.
    """
    over = render_stats_dict(stats, max_length)["over_max_length"]
    if not stats.total or over / stats.total <= threshold:
        return None
    return (f"{over / stats.total:.1%} of the training examples ({over} of {stats.total}) are "
            f"longer than MAX_SEQUENCE_LENGTH={max_length} ({stats.truncated} truncated, "
            f"{over - stats.truncated} skipped); MAX_SEQUENCE_LENGTH="
            f"{length_covering(stats.lengths)} would keep 95% of them whole")


def positions_warning(examples: Sequence[RenderedExample], model: str) -> str | None:
    """A message when an example kept for training feeds the model more positions than
    ``model`` was trained for (:func:`tinkerkit.models.max_positions`); None when none does, or
    that count is unknown. An example of N tokens feeds N - 1 positions (its last token is only
    a target).

    Rotary models do not fail past their positions: they train and answer there, untrained.
    """
    positions = max_positions(model) if examples else None
    if positions is None:
        return None
    over = [e.n_tokens + 1 for e in examples if e.n_tokens > positions]
    if not over:
        return None
    return (f"{len(over)} of the {len(examples)} training examples are longer than the "
            f"{positions} positions {model} was trained for (max_position_embeddings in its "
            f"config.json; the longest has {max(over)} tokens); the model has never seen the "
            f"positions past them: lower MAX_SEQUENCE_LENGTH to {positions} or use a "
            "longer-context model")
