"""The supervised training loop: rendered examples -> forward_backward -> optim_step.

One function, :func:`train`, reads top to bottom: build -> resume -> for each optimizer step
(batch -> forward_backward -> optim_step -> log -> maybe save) -> final save. Helpers beside it are
pure functions. ``step`` always means an optimizer step; metrics and checkpoints count steps from 1.

Loss normalization: each example's weights are divided by the number of weighted tokens in the
whole step, so the engine's summed loss (Tinker's cross_entropy, ``sum(weights * -logprob)``) is the
mean negative log-likelihood per weighted token of the step — not a mean of per-example means.

Exact resume: the data order of an epoch is a permutation drawn from ``(seed, epoch)``, the learning
rate is a function of the step, and the engine restores weights, AdamW moments and its RNG, so a
resumed run sees the same batches in the same order and ends with the same weights.

Evaluation during training (``EVAL_EVERY``, ``SAMPLE_EVAL_EVERY``) reads the weights and never
writes them: the held-out loss is a gradient-free ``forward`` queued right after the step's
``optim_step``, and sampling runs on a snapshot of the adapter, so a run ends with the same adapter
with evaluation on or off. Its results join the step's line in ``metrics.jsonl``.

Guards: too many over-long examples warn (or stop, with ``STRICT``) before the model is loaded; a
loss that stops falling warns; a NaN/inf loss or gradient norm stops the run with the last good
checkpoint still the latest listed.

Example::

    config = load_config("config.py")
    result = train(config)
    print(result.final_checkpoint)
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import tinker
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from tinkerkit import io
from tinkerkit.checkpoint import (
    CHECKPOINTS_FILE,
    checkpoint_path,
    is_tinker_path,
    latest_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from tinkerkit.config import LRSchedule, TrainConfig, build_config
from tinkerkit.data.conversation import Conversation
from tinkerkit.data.formats import load_conversations
from tinkerkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EngineError,
    NonFiniteGradientError,
    TinkerkitError,
)
from tinkerkit.render import (
    RenderedExample,
    Renderer,
    RenderStats,
    print_render_stats,
    render_stats_dict,
)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EXPORT_DIR = "export"
LENGTH_ROUNDING = 64
"""Suggested ``MAX_SEQUENCE_LENGTH`` values are rounded up to a multiple of this many tokens."""


class TrainingDivergedError(TinkerkitError, RuntimeError):
    """The training loss or gradient norm became NaN or infinite; the run was stopped."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves behind.

    Attributes:
        run_dir: The run directory.
        final_checkpoint: Path of the last checkpoint (the seed's ``model_path``).
        steps: Optimizer steps completed.
        losses: Per-step losses of this invocation (mean NLL per weighted token).
    """

    run_dir: Path
    final_checkpoint: str
    steps: int
    losses: list[float]


# -- pure helpers -------------------------------------------------------------------------------

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


def normalize_batch(examples: Sequence[RenderedExample]) -> tuple[list[tinker.types.Datum], int, int]:
    """Scale weights by 1 / (weighted tokens in the whole batch).

    Returns:
        The datums with scaled weights, the number of weighted tokens, and the number of tokens.
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


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, int]:
    """Optimizer steps per epoch and in total (``MAX_STEPS`` caps ``NUM_EPOCHS`` epochs).

    Raises:
        ConfigError: ``BATCH_SIZE`` is larger than the number of examples.
    """
    if config.batch_size > n_examples:
        raise ConfigError(f"BATCH_SIZE={config.batch_size} is larger than the {n_examples} "
                          f"training examples of {', '.join(config.data_files)}; lower it or "
                          "add data")
    per_epoch = batches_per_epoch(n_examples, config.batch_size)
    all_epochs = per_epoch * config.num_epochs
    return per_epoch, min(config.max_steps or all_epochs, all_epochs)


def is_due(step: int, every: int, total_steps: int) -> bool:
    """Whether an every-N-steps action runs after step ``step`` (1-based): every N-th step and
    the last one; never when N is 0."""
    return every > 0 and (step % every == 0 or step == total_steps)


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
    from tinkerkit.models import max_positions

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


def plateau_warning(losses: Sequence[float], window: int) -> str | None:
    """A message when the mean of the last ``window`` losses is not below that of the ``window``
    before; checked once per window (when ``len(losses)`` is a multiple of it), never for 0."""
    if not window or len(losses) < 2 * window or len(losses) % window:
        return None
    before, last = np.mean(losses[-2 * window:-window]), np.mean(losses[-window:])
    if last < before:
        return None
    return (f"the training loss has not fallen over the last {window} steps (mean {last:.4f}, "
            f"the {window} before {before:.4f}): lower LEARNING_RATE if it jumps around or rises, "
            f"raise it (or LORA_RANK) if it barely moves")


def peak_memory_gib() -> float:
    """Peak resident memory of this process in GiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- run directory and resume -------------------------------------------------------------------

def default_run_dir() -> Path:
    """``runs/<YYYYmmdd-HHMMSS>``, with a suffix when that directory exists already."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a fresh run where another run already logged steps or checkpoints.

    Raises:
        ConfigError: ``run_dir`` is a file, or holds ``metrics.jsonl``/``checkpoints.jsonl``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: exists and is not a directory")
    if (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINTS_FILE).exists():
        if _lists_no_checkpoint(run_dir):
            raise ConfigError(f"--run-dir {run_dir} holds a run that {_NOTHING_TO_RESUME}; "
                              f"remove {run_dir} to start it again there, or choose another "
                              "--run-dir")
        raise ConfigError(f"--run-dir {run_dir} already holds a run; continue it with "
                          f"--resume {run_dir}, or choose another --run-dir")


_NOTHING_TO_RESUME = "stopped before its first checkpoint, so there is nothing to resume"


def _lists_no_checkpoint(run_dir: Path) -> bool:
    """Whether ``checkpoints.jsonl`` is missing or empty (a damaged file lists something:
    ``--resume`` then names the damage)."""
    try:
        return not io.read_jsonl(run_dir / CHECKPOINTS_FILE)
    except DataError:
        return False


def resolve_resume(path: str | Path) -> tuple[Path, dict]:
    """Find the run directory and ``checkpoints.jsonl`` entry of ``--resume PATH``.

    Args:
        path: A run directory (its latest checkpoint) or a checkpoint directory inside one.

    Returns:
        The run directory and the entry, its ``path`` resolved against the run directory.

    Raises:
        CheckpointError: Not a run directory or a complete checkpoint listed in one (a
            ``tinker://`` checkpoint is resumed through the run directory that lists it).
    """
    if is_tinker_path(path):
        raise CheckpointError(f"--resume {path}: resume the run directory whose "
                              f"{CHECKPOINTS_FILE} lists it (it knows the step and data order), "
                              f"or start a new stage from it with --init-from")
    path = Path(path)
    if (path / METRICS_FILE).is_file() and _lists_no_checkpoint(path):
        # killed before its first save (SAVE_EVERY steps, or the end with SAVE_EVERY=0)
        raise CheckpointError(f"--resume {path}: the run {_NOTHING_TO_RESUME}{_saves(path)}; "
                              f"start it again: remove {path}, or choose another --run-dir")
    if (path / CHECKPOINTS_FILE).is_file():
        return path, latest_checkpoint(path)
    run_dir = path.parent.parent
    for entry in io.read_jsonl(run_dir / CHECKPOINTS_FILE):
        if Path(checkpoint_path(run_dir, entry)).resolve() == path.resolve():
            read_checkpoint_meta(path)
            return run_dir, {**entry, "path": str(path)}
    raise CheckpointError(f"--resume {path}: not a run directory or a checkpoint listed in "
                          f"a run's {CHECKPOINTS_FILE} (use --init-from to start a new stage)")


def _saves(run_dir: Path) -> str:
    """`` (it saves every N steps: SAVE_EVERY=N)`` from a run's saved config, or ``""``."""
    try:
        every = io.read_json(run_dir / CONFIG_FILE).get("SAVE_EVERY")
    except (OSError, ValueError, AttributeError):
        return ""
    if every == 0:
        return " (it saves only at its last step: SAVE_EVERY=0)"
    return f" (it saves every {every} steps: SAVE_EVERY={every})" if isinstance(every, int) else ""


def config_for_resume(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved in a run directory, with ``overrides`` (lower-case fields) applied."""
    try:
        saved = io.read_json(run_dir / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: cannot read the run's config: {e}") from e
    values = {k.lower(): v for k, v in saved.items()}
    origins = dict.fromkeys(values, str(run_dir / CONFIG_FILE))
    values.update(overrides or {})
    origins.update(dict.fromkeys(overrides or {}, "the command line"))
    return build_config(values, origins)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop metric and checkpoint lines after ``step`` so every step is logged exactly once."""
    for name in (METRICS_FILE, CHECKPOINTS_FILE):
        records = io.read_jsonl(run_dir / name)
        io.rewrite_jsonl(run_dir / name, [r for r in records if r["step"] <= step])


# -- data ---------------------------------------------------------------------------------------

def split_data(config: TrainConfig
               ) -> tuple[list[Conversation], list[Conversation], list[tuple[str, str]]]:
    """Load ``DATA_FILES``; with ``EVAL_SPLIT_RATIO``, hold part of them out.

    The hold-out follows :func:`tinkerkit.data.split.split_conversations` with ``SEED``: records
    with the same prompt stay on one side, and the same files and seed give the same split.

    Returns:
        The training conversations, the held-out ones (empty without ``EVAL_SPLIT_RATIO``), and
        the records the loader skipped (``(where, reason)``).
    """
    from tinkerkit.data.split import split_conversations

    if not config.data_files:
        raise ConfigError("DATA_FILES is empty: name at least one training file")
    loaded = load_conversations(config.data_files, format=config.data_format,
                                on_error=config.on_error)
    if config.eval_split_ratio is None:
        return loaded.conversations, [], loaded.skipped
    train_set, held_out = split_conversations(loaded.conversations, config.eval_split_ratio,
                                              None, config.seed)
    return train_set, held_out, loaded.skipped


def make_renderer(config: TrainConfig, tokenizer) -> Renderer:
    """The training renderer of ``config`` (chat template, TRAIN_ON, length policy)."""
    return Renderer(tokenizer, config.train_on, config.max_sequence_length,
                    config.truncate_long_sequences)


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


@dataclass(frozen=True)
class HeldOut:
    """The held-out set of evaluation during training.

    Attributes:
        conversations: In order; the first ``SAMPLE_EVAL_LIMIT`` are sampled for eval_accuracy.
        batches: The rendered examples as datums whose weights are divided by the weighted tokens
            of the whole set, in chunks of ``BATCH_SIZE``: the ``loss:sum`` of ``forward`` summed
            over the chunks is the mean NLL per weighted token of the set.
        renderer: The training renderer (evaluation prompts are its generation prompts).
    """

    conversations: list[Conversation]
    batches: list[list[tinker.types.Datum]]
    renderer: Renderer


def load_held_out(config: TrainConfig, tokenizer, console: Console) -> HeldOut | None:
    """The held-out set (``EVAL_DATA_FILES`` or ``EVAL_SPLIT_RATIO``); None without evaluation.

    Raises:
        DataError: ``EVAL_EVERY`` is set and no held-out example renders.
    """
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
        raise DataError("no held-out example left after rendering for EVAL_EVERY "
                        f"({stats.skipped} skipped, {stats.failed} failed)")
    console.print(f"Held out for evaluation: {len(conversations)} examples ({stats.truncated} "
                  f"truncated, {stats.skipped} skipped, {stats.failed} failed in eval_loss)")
    datums = normalize_batch(examples)[0]
    batches = [datums[i:i + config.batch_size] for i in range(0, len(datums), config.batch_size)]
    return HeldOut(conversations, batches, renderer)


def sample_accuracy(client, held_out: HeldOut, config: TrainConfig) -> float | None:
    """Accuracy (mathematical equivalence) on the first ``SAMPLE_EVAL_LIMIT`` held-out examples.

    Samples from a snapshot of the current weights (after the queued steps), with the prompts,
    sampling settings and grading of ``tinkerkit eval``; None when none has a reference answer.
    """
    from tinkerkit.evaluate import evaluate, training_eval_settings

    tokenizer = client.get_tokenizer()
    settings = training_eval_settings(config, tokenizer, config.sample_eval_limit)
    sampler = client.save_weights_and_get_sampling_client()
    try:
        result = evaluate(held_out.conversations, sampler, held_out.renderer.build_prompt,
                          tokenizer, settings, progress=False)
    finally:
        sampler.close()
    return result.metrics["accuracy_equivalent"]


# -- the loop -----------------------------------------------------------------------------------

def _progress(console: Console) -> Progress:
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=console, transient=False)


def train(config: TrainConfig, *, run_dir: str | Path | None = None, resume: str | None = None,
          init_from: str | None = None, console: Console | None = None) -> TrainResult:
    """Train a LoRA adapter as ``config`` says, in ``run_dir``.

    Args:
        config: The validated settings.
        run_dir: Where logs and checkpoints go (default ``config.run_dir`` or ``runs/<time>``).
        resume: A run directory or checkpoint to continue exactly (weights, optimizer, data order).
        init_from: A checkpoint (or a run directory: its latest one) whose weights start a new
            stage with a fresh optimizer and schedule.
        console: Where to print (default: a new rich console).

    Returns:
        The :class:`TrainResult`.

    Raises:
        ConfigError, DataError, ModelError, CheckpointError: Bad settings, data or checkpoints.
        TrainingDivergedError: The loss or gradient norm became NaN/inf (no checkpoint after it).
        ExportError: ``EXPORT_AFTER_TRAINING`` and the export failed.
    """
    from tinkerkit.engines import create_training_client, load_engine_tokenizer

    console = console or Console()
    start_step = 0
    if resume:
        run_dir, entry = resolve_resume(resume)
        start_step = entry["step"]
    run_dir = Path(run_dir or config.run_dir or default_run_dir())
    if not resume:
        check_new_run_dir(run_dir)
    if init_from:  # a run directory means its latest checkpoint, as for eval and export
        init_from = resolve_checkpoint(init_from)
    # Data first: a bad file or too many long examples fail in seconds, before the model loads.
    tokenizer = load_engine_tokenizer(config)
    held_out = load_held_out(config, tokenizer, console)
    examples = load_examples(config, tokenizer, console)
    per_epoch, total_steps = plan_steps(len(examples), config)
    if start_step >= total_steps:
        console.print(f"{run_dir} has finished: it is at step {start_step} of {total_steps}; "
                      "nothing to do (raise MAX_STEPS or NUM_EPOCHS to train further)")
        return TrainResult(run_dir, entry["path"], start_step, [])
    client = create_training_client(config, run_dir / "checkpoints",
                                    state=entry["path"] if resume else init_from,
                                    with_optimizer=bool(resume))
    if resume:
        truncate_logs(run_dir, start_step)
        console.print(f"Resuming {run_dir} from step {start_step} ({entry['path']})")
        for reason in entry.get("skipped", []):
            console.print(f"skipped the newer {reason}; the steps after {start_step} are "
                          "trained and saved again")
    io.atomic_write_json(run_dir / CONFIG_FILE,
                         config.model_copy(update={"run_dir": str(run_dir)}).dump())
    console.print(f"Training {total_steps} steps ({per_epoch} per epoch, batch {config.batch_size}) "
                  f"in {run_dir}")

    pending = None
    last_checkpoint = entry["path"] if resume else None
    started = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("train", total=total_steps, completed=start_step, info="")
        log = StepLog(run_dir, progress, task, config.loss_plateau_window)
        for step in range(start_step, total_steps):
            epoch, indices = batch_indices(step, len(examples), config.batch_size, config.seed)
            datums, weighted, tokens = normalize_batch([examples[i] for i in indices])
            lr = learning_rate_at(step, total_steps, config)
            # Submit this step before awaiting the previous one (the SDK's pipelining). The
            # held-out forward queues behind this step's optim_step and takes no gradient.
            submitted = PendingStep(step, epoch, lr, weighted, tokens,
                                    client.forward_backward(datums, "cross_entropy"),
                                    client.optim_step(adam_params(config, lr)))
            if is_due(step + 1, config.eval_every, total_steps):
                submitted.eval_loss = [client.forward(batch, "cross_entropy")
                                       for batch in held_out.batches]
            if pending is not None:
                _record(pending, log)
            if is_due(step + 1, config.sample_eval_every, total_steps):
                submitted.evaluations["eval_accuracy"] = sample_accuracy(client, held_out, config)
            pending = submitted
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                _record(pending, log)
                pending = None
                last_checkpoint = _save(client, run_dir, step + 1, epoch)
        if pending is not None:
            _record(pending, log)
    if total_steps > start_step or last_checkpoint is None:
        last_checkpoint = _save(client, run_dir, total_steps, (total_steps - 1) // per_epoch)
    wall = time.perf_counter() - started
    exported = export_final(last_checkpoint, run_dir, config, console)
    plot_loss_curve(run_dir)
    _summarize(console, run_dir, total_steps - start_step, wall, last_checkpoint, exported)
    return TrainResult(run_dir, last_checkpoint, total_steps, log.losses)


def adam_params(config: TrainConfig, lr: float) -> tinker.types.AdamParams:
    """The AdamW hyperparameters of one step."""
    return tinker.types.AdamParams(learning_rate=lr, beta1=config.adam_beta1,
                                   beta2=config.adam_beta2, eps=config.adam_eps,
                                   weight_decay=config.weight_decay,
                                   grad_clip_norm=config.grad_clip_norm)


class StepTimer:
    """Wall seconds between consecutive completed steps (the first from the loop's start)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


@dataclass
class PendingStep:
    """A submitted optimizer step whose results are not yet recorded.

    Attributes:
        step: 0-based optimizer step; ``epoch`` 0-based; ``lr`` its learning rate.
        weighted: Weighted tokens of the batch; ``tokens`` all its tokens.
        forward_backward: Future of the step's ``ForwardBackwardOutput``.
        optim_step: Future of its ``OptimStepResponse``.
        eval_loss: Futures of the held-out ``forward`` calls after this step (empty: none due).
        evaluations: Results already known (``eval_accuracy``), logged with the step.
    """

    step: int
    epoch: int
    lr: float
    weighted: int
    tokens: int
    forward_backward: Future
    optim_step: Future
    eval_loss: list[Future] = field(default_factory=list)
    evaluations: dict = field(default_factory=dict)

    def results(self) -> dict:
        """The evaluation results of this step: ``eval_loss`` (summed over the held-out chunks,
        whose weights make the sum the mean NLL per weighted token) and ``evaluations``."""
        results = {}
        if self.eval_loss:
            results["eval_loss"] = sum(float(f.result().metrics["loss:sum"]) for f in self.eval_loss)
        return {**results, **self.evaluations}


@dataclass
class StepLog:
    """Where completed steps go: ``metrics.jsonl``, the progress bar, the loss history."""

    run_dir: Path
    progress: Progress
    task: TaskID
    plateau_window: int
    timer: StepTimer = field(default_factory=StepTimer)
    losses: list[float] = field(default_factory=list)


def _stopped(run_dir: Path, advice: str) -> str:
    """``training stopped, <where to resume>``: the last checkpoint of ``checkpoints.jsonl``."""
    saved = io.read_jsonl(run_dir / CHECKPOINTS_FILE)
    if not saved:
        return ("training stopped, no checkpoint was saved before it (SAVE_EVERY=0 saves only "
                "at the end)")
    last = checkpoint_path(run_dir, saved[-1])
    return (f"training stopped, the last good checkpoint, {last} (step {saved[-1]['step']}), is "
            f"the latest in {run_dir / CHECKPOINTS_FILE}: {advice}continue with --resume {run_dir}")


def divergence_error(run_dir: Path, step: int, what: str) -> TrainingDivergedError:
    """The one-line error of a NaN/inf step, naming the last good checkpoint."""
    return TrainingDivergedError(f"step {step}: {what}; "
                                 + _stopped(run_dir, "lower LEARNING_RATE or check the data, then "))


def _record(pending: PendingStep, log: StepLog) -> float:
    """Await a step, check it is finite, log its line (with evaluations) and return its loss.

    Divergence is a non-finite number only: a NaN/inf loss, a gradient norm the engine reports
    as NaN/inf (``grad_norm`` in the optimizer step's metrics), or an optimizer step the engine
    skipped for one (:class:`~tinkerkit.errors.NonFiniteGradientError`). Any other failure of
    the step (a lost connection, a server error) is reported as what it is. Nothing of a failed
    step is logged or saved, so the last checkpoint stays the latest in ``checkpoints.jsonl``.

    Raises:
        TrainingDivergedError: The step diverged (see above).
        EngineError: The engine failed the step for another reason; the message names the step
            and the checkpoint to resume from.
    """
    step = pending.step + 1
    try:
        loss = float(pending.forward_backward.result().metrics["loss:sum"])
        if not math.isfinite(loss):
            raise divergence_error(log.run_dir, step, f"the training loss is {loss}")
        optimized = pending.optim_step.result()
    except NonFiniteGradientError as e:
        raise divergence_error(log.run_dir, step, f"the optimizer step was refused ({e})") from e
    except TrainingDivergedError:
        raise
    except EngineError as e:
        raise EngineError(f"step {step}: {e}; {_stopped(log.run_dir, 'once the cause is fixed, ')}"
                          ) from e
    grad_norm = (getattr(optimized, "metrics", None) or {}).get("grad_norm")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise divergence_error(log.run_dir, step, f"the gradient norm is {grad_norm}")
    seconds = log.timer.lap()
    evaluations = pending.results()
    io.append_jsonl(log.run_dir / METRICS_FILE, {
        "step": step, "epoch": pending.epoch + 1, "loss": loss, "lr": pending.lr,
        "weighted_tokens": pending.weighted, "total_tokens": pending.tokens,
        "seconds": round(seconds, 4), **evaluations})
    log.losses.append(loss)
    log.progress.update(log.task, advance=1,
                        info=f"epoch {pending.epoch + 1} loss {loss:.4f} lr {pending.lr:.2e} "
                             f"{pending.tokens / max(seconds, 1e-9):.0f} tok/s")
    if evaluations:
        log.progress.console.print(f"step {step}: " + "  ".join(
            f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in evaluations.items()))
    warning = plateau_warning(log.losses, log.plateau_window)
    if warning:
        log.progress.console.print(f"[yellow]Warning (step {step}): {warning}[/yellow]")
    return loss


def _save(client, run_dir: Path, step: int, epoch: int) -> str:
    path = client.save_state(f"step_{step:06d}").result().path
    recorded = path
    if "://" not in path and Path(path).resolve().is_relative_to(run_dir.resolve()):
        recorded = str(Path(path).resolve().relative_to(run_dir.resolve()))
    io.append_jsonl(run_dir / CHECKPOINTS_FILE, {"step": step, "epoch": epoch + 1,
                                                "path": recorded, "kind": "state"})
    return path


def export_final(checkpoint: str, run_dir: Path, config: TrainConfig, console: Console):
    """With ``EXPORT_AFTER_TRAINING``, export ``checkpoint`` into ``run_dir/export`` exactly as
    ``tinkerkit export CHECKPOINT --output run_dir/export [--merge] --dtype EXPORT_DTYPE`` would.

    Returns:
        The :class:`~tinkerkit.export.ExportResult`, or None when export is off.
    """
    if not config.export_after_training:
        return None
    from tinkerkit.export import export_checkpoint

    console.print(f"Exporting {checkpoint} to {run_dir / EXPORT_DIR}")
    result = export_checkpoint(checkpoint, run_dir / EXPORT_DIR, merge=config.export_merged,
                               dtype=config.export_dtype, base_url=config.tinker_base_url)
    if result.merged_dir is not None:
        console.print(f"Merged model ({result.dtype}): max |logit diff| = "
                      f"{result.max_logit_diff:.3g} (tolerance {result.tolerance:.3g})")
    return result


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Draw ``metrics.jsonl`` as ``loss_curve.png`` (training loss, and ``eval_loss`` if logged)."""
    import io as _io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = io.read_jsonl(run_dir / METRICS_FILE)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records if "loss" in r], [r["loss"] for r in records if "loss" in r],
            label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean NLL per weighted token")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = run_dir / "loss_curve.png"
    io.atomic_write_bytes(path, buffer.getvalue())
    return path


def _summarize(console: Console, run_dir: Path, steps: int, wall: float, checkpoint: str,
               exported) -> None:
    records = io.read_jsonl(run_dir / METRICS_FILE)
    all_losses = [r["loss"] for r in records]
    tokens = sum(r["total_tokens"] for r in records[-steps:]) if steps else 0
    summary = {
        "steps": len(records),
        "first_10_mean_loss": float(np.mean(all_losses[:10])) if all_losses else None,
        "last_10_mean_loss": float(np.mean(all_losses[-10:])) if all_losses else None,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "wall_seconds": round(wall, 1),
        "model_path": checkpoint,
    }
    for name in ("eval_loss", "eval_accuracy"):  # the last value logged, if any
        logged = [r for r in records if name in r]
        if logged:
            summary[f"final_{name}"] = logged[-1][name]
    if exported is not None:
        summary["export_adapter"] = str(exported.adapter_dir)
        if exported.merged_dir is not None:
            summary["export_merged"] = str(exported.merged_dir)
    io.atomic_write_json(run_dir / "summary.json", summary)
    console.print("[bold]Training finished[/bold]")
    for key, value in summary.items():
        console.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


# -- dry run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DryRunReport:
    """What ``tinkerkit train --dry-run`` measured.

    Attributes:
        examples: Training examples after rendering.
        steps: Optimizer steps a run would take.
        seconds_per_step: Wall seconds of one ``forward_backward`` on the first batch (no
            optimizer step; the first call also pays one-time warm-up costs); None with
            ``BACKEND=tinker``, where nothing runs on the server.
        first_loss: That batch's loss (mean NLL per weighted token) at the start weights; None
            with ``BACKEND=tinker``.
    """

    examples: int
    steps: int
    seconds_per_step: float | None
    first_loss: float | None


def dry_run(config: TrainConfig, console: Console | None = None) -> DryRunReport:
    """Render the whole dataset, print the statistics, the steps and a time per step; no training.

    The seed's "test small first": the data and length guards run as in :func:`train`, the model
    loads, and one ``forward_backward`` on the first batch of ``BATCH_SIZE`` examples is timed
    and discarded (no ``optim_step``, no checkpoint, nothing written).

    With ``BACKEND=tinker`` no service client is created and no session opened (on the hosted
    service a session is billed): the data, the length guards and the LoRA settings are checked
    as a run checks them, and nothing is timed.

    Raises:
        ConfigError, DataError, ModelError: As :func:`train` before its first step.
    """
    from tinkerkit.engines import create_training_client, load_engine_tokenizer

    console = console or Console()
    tokenizer = load_engine_tokenizer(config)
    examples = load_examples(config, tokenizer, console)
    load_held_out(config, tokenizer, console)
    per_epoch, total_steps = plan_steps(len(examples), config)
    planned = (f"Dry run: {len(examples)} examples, {total_steps} steps ({per_epoch} per epoch, "
               f"batch {config.batch_size})")
    if config.backend == "tinker":
        from tinkerkit.engines.tinker import lora_options

        lora_options(config)  # the LoRA settings Tinker lacks are refused here, as in a run
        console.print(f"{planned}; BACKEND=tinker: no session was opened on the Tinker server "
                      "(a session on the hosted service is billed), so no step was timed. "
                      "Nothing was trained or written.")
        return DryRunReport(len(examples), total_steps, None, None)
    client = create_training_client(config, default_run_dir() / "checkpoints")  # never written
    _, indices = batch_indices(0, len(examples), config.batch_size, config.seed)
    datums, _, tokens = normalize_batch([examples[i] for i in indices])
    started = time.perf_counter()
    loss = float(client.forward_backward(datums, "cross_entropy").result().metrics["loss:sum"])
    seconds = time.perf_counter() - started
    console.print(f"{planned}; one forward_backward on the first batch "
                  f"({tokens} tokens) took {seconds:.2f} s, so about {seconds * total_steps:.0f} s "
                  f"for the run; its loss {loss:.4f}. Nothing was trained or written.")
    return DryRunReport(len(examples), total_steps, seconds, loss)
