"""The held-out set of evaluation during training (``EVAL_EVERY``, ``SAMPLE_EVAL_EVERY``).

Evaluation reads the weights and never writes them: the held-out loss is a gradient-free
``forward`` queued right after a step's ``optim_step``, and sampling runs on a snapshot of the
adapter, so a run ends with the same adapter with evaluation on or off. Its results join the
step's line in ``metrics.jsonl``. Sampled answers are graded by the config's ``GRADER`` exactly
as ``tinkerkit eval`` grades them (the same :class:`~tinkerkit.grader.Grader`, loaded and checked
with the held-out data, before the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import tinker
from rich.console import Console

from tinkerkit.config import TrainConfig
from tinkerkit.data.conversation import Conversation
from tinkerkit.data.formats import load_conversations
from tinkerkit.errors import DataError, plural
from tinkerkit.evaluate import evaluate, training_eval_settings
from tinkerkit.grader import Grader, GraderConfig
from tinkerkit.render import Renderer
from tinkerkit.train.examples import make_renderer, normalize_batch, split_data


@dataclass(frozen=True)
class HeldOut:
    """The held-out set of evaluation during training.

    Attributes:
        conversations: In order; the first ``SAMPLE_EVAL_LIMIT`` are sampled for eval_accuracy.
        batches: The rendered examples as datums whose weights are divided by the weighted tokens
            of the whole set, in chunks of ``BATCH_SIZE``: the ``loss:sum`` of ``forward`` summed
            over the chunks is the mean NLL per weighted token of the set.
        renderer: The training renderer (evaluation prompts are its generation prompts).
        grader: Grades the sampled answers (``GRADER``; the built-in grader without one).
    """

    conversations: list[Conversation]
    batches: list[list[tinker.types.Datum]]
    renderer: Renderer
    grader: Grader


def _check_grader(config: TrainConfig, console: Console) -> Grader:
    """The config's grader, loaded and checked; a grader nothing will use is checked, closed and
    noted.

    Raises:
        ConfigError: The ``GRADER`` file does not load or check.
    """
    grader = GraderConfig.from_config(config).build()
    if config.grader and not config.sample_eval_every:
        grader.close()
        console.print(f"[yellow]Note:[/yellow] GRADER={config.grader} grades `tinkerkit eval` "
                      "and SAMPLE_EVAL_EVERY; SAMPLE_EVAL_EVERY is 0, so nothing is graded "
                      "during training")
    return grader


def load_held_out(config: TrainConfig, tokenizer, console: Console,
                  grader: Grader | None = None) -> HeldOut | None:
    """The held-out set (``EVAL_DATA_FILES`` or ``EVAL_SPLIT_RATIO``); None without evaluation.

    The ``GRADER`` file, if any, is loaded and checked here too, so that a broken one stops the
    run before the model loads (also when nothing grades during training: it is then closed).

    Args:
        config: The data, evaluation and grader settings.
        tokenizer: Renders the held-out examples.
        console: Where notes and statistics go.
        grader: A grader the caller built and closes (``tinkerkit rl`` grades its rewards with
            it); None loads the config's.

    Raises:
        DataError: ``EVAL_EVERY`` is set and no held-out example renders.
        ConfigError: The ``GRADER`` file does not load or check.
    """
    grader = grader or _check_grader(config, console)
    if not (config.eval_every or config.sample_eval_every):
        if config.eval_split_ratio is not None:
            console.print(f"[yellow]Note:[/yellow] EVAL_SPLIT_RATIO={config.eval_split_ratio} "
                          "holds data out of training, but EVAL_EVERY and SAMPLE_EVAL_EVERY are 0, "
                          "so nothing evaluates it")
        return None
    if config.eval_split_ratio is not None:
        conversations = split_data(config)[1]
    else:
        try:
            conversations = load_conversations(config.eval_data_files, format=config.data_format,
                                               on_error=config.on_error).conversations
        except DataError as e:
            raise DataError(f"EVAL_DATA_FILES: {e}") from e
    renderer = make_renderer(config, tokenizer)
    examples, stats = renderer.render_dataset(conversations)
    if config.eval_every and not examples:
        files = config.eval_data_files if config.eval_split_ratio is None else config.data_files
        raise DataError("no held-out example left after rendering for EVAL_EVERY "
                        f"({stats.skipped} skipped, {stats.failed} failed)",
                        path=", ".join(map(str, files)))
    console.print(f"Held out for evaluation: {plural(len(conversations), 'example')} "
                  f"({stats.truncated} truncated, {stats.skipped} skipped, {stats.failed} failed in eval_loss)")
    datums = normalize_batch(examples)[0]
    batches = [datums[i:i + config.batch_size] for i in range(0, len(datums), config.batch_size)]
    return HeldOut(conversations, batches, renderer, grader)


def sample_evaluations(client, held_out: HeldOut, config: TrainConfig,
                       console: Console | None = None) -> dict:
    """Sample and grade the first ``SAMPLE_EVAL_LIMIT`` held-out examples.

    Samples from a snapshot of the current weights (after the queued steps), with the prompts,
    sampling settings and grader (``held_out.grader``) of ``tinkerkit eval``.

    Args:
        client: The training client (``save_weights_and_get_sampling_client``).
        held_out: The held-out set and its grader.
        config: The sampling settings and ``SAMPLE_EVAL_LIMIT``.
        console: Where the grader's failures are printed, if any (a new console by default).

    Returns:
        ``{"eval_accuracy": accuracy under mathematical equivalence (None when no example has a
        reference answer)}``, plus with a ``GRADER`` file ``"eval_grading_errors"`` (outputs it
        failed on, counted as wrong) and, when it defines ``score``, ``"eval_score"`` (the mean
        score).
    """
    tokenizer = client.get_tokenizer()
    settings = training_eval_settings(config, tokenizer, config.sample_eval_limit)
    sampler = client.save_weights_and_get_sampling_client()
    try:
        result = evaluate(held_out.conversations, sampler, held_out.renderer.build_prompt,
                          tokenizer, settings, progress=False, grader=held_out.grader)
    finally:
        sampler.close()
    evaluations = {"eval_accuracy": result.metrics["accuracy_equivalent"]}
    if held_out.grader.scores:
        evaluations["eval_score"] = result.metrics["mean_score"]
    if held_out.grader.path is not None:
        evaluations["eval_grading_errors"] = result.metrics["grading_errors"]
        for warning in result.warnings:
            if warning.startswith("the grader failed"):
                (console or Console()).print(f"[yellow]Warning: {warning}[/yellow]",
                                             soft_wrap=True)
    return evaluations
