"""The supervised training loop: :func:`train` and the two step helpers it needs.

:func:`train` reads top to bottom: build -> resume -> for each optimizer step (batch ->
forward_backward -> optim_step -> log -> maybe evaluate/save) -> final save. ``step`` always means
an optimizer step; metrics and checkpoints count steps from 1.

Pipelining: step N is submitted (its ``forward_backward`` and ``optim_step`` queued on the engine)
before step N-1's results are awaited, so the engine computes step N while step N-1 is checked
and logged. A checkpoint breaks the pipeline once: the step it holds is awaited (and found finite)
before ``save_state``, and the next step is submitted after it.

Divergence: a NaN/inf loss or gradient norm stops the run before anything of that step is logged
or saved, so the last good checkpoint stays the latest in ``checkpoints.jsonl``.

Exact resume: the data order and the learning rate are functions of the step
(:mod:`tinkerkit.train.schedule`), and the engine restores weights, AdamW moments and its RNG, so a
resumed run sees the same batches in the same order and ends with the same weights.

Example::

    config = load_config("config.py")
    result = train(config)
    print(result.final_checkpoint)
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tinkerkit import engines
from tinkerkit.config import TrainConfig
from tinkerkit.errors import (
    EngineError,
    NonFiniteGradientError,
    TrainingDivergedError,
    plural,
)
from tinkerkit.train.examples import load_examples, normalize_batch
from tinkerkit.train.held_out import load_held_out, sample_evaluations
from tinkerkit.train.metrics import (
    StepLog,
    StepRecord,
    StepTimer,
    plot_loss_curve,
    progress_bar,
    write_summary,
)
from tinkerkit.train.run_dir import (
    export_final,
    interrupt_names_checkpoint,
    open_client,
    save_checkpoint,
    start_run,
    stopped_message,
)
from tinkerkit.train.schedule import (
    adam_params,
    batch_indices,
    is_due,
    learning_rate_at,
    plan_steps,
)
from tinkerkit.train.trackers import check_trackers, open_trackers


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
        EngineError: The engine failed a step for another reason (the message names the
            checkpoint to resume from).
        ExportError: ``EXPORT_AFTER_TRAINING`` and the export failed.
    """
    console = console or Console()
    start = start_run(config, run_dir, resume, init_from)
    run_dir, start_step = start.run_dir, start.start_step
    check_trackers(config.report_to)  # a missing tracker package fails before the model loads
    # Data first: a bad file or too many long examples fail in seconds, before the model loads.
    tokenizer = engines.load_engine_tokenizer(config)
    held_out = load_held_out(config, tokenizer, console)
    examples = load_examples(config, tokenizer, console)
    per_epoch, total_steps = plan_steps(len(examples), config)
    if start.finished(total_steps, console):
        return TrainResult(run_dir, start.resumed["path"], start_step, [])
    client, resolved, kept, logged_through = open_client(config, start, console)
    console.print(f"Training {plural(total_steps, 'step')} ({per_epoch} per epoch, batch "
                  f"{config.batch_size}) in {run_dir}")

    started = time.perf_counter()
    # Ctrl-C here stops with the checkpoint to resume from (TrainingInterrupted).
    with open_trackers(config.report_to, run_dir, resolved, kept, logged_through) as trackers:
        with progress_bar(console) as progress, interrupt_names_checkpoint(run_dir):
            task = progress.add_task("train", total=total_steps, completed=start_step, info="")
            log = StepLog(run_dir, progress, task, config.loss_plateau_window, trackers)
            timer = StepTimer()
            previous = None  # the step submitted in the last iteration and not awaited yet
            for step in range(start_step, total_steps):
                epoch, indices = batch_indices(step, len(examples), config.batch_size, config.seed)
                datums, weighted, tokens = normalize_batch([examples[i] for i in indices])
                lr = learning_rate_at(step, total_steps, config)
                # 1. Submit this step; nothing is awaited, the engine queues it behind the last.
                current = PendingStep(step, epoch, lr, weighted, tokens,
                                      client.forward_backward(datums, "cross_entropy"),
                                      client.optim_step(adam_params(config, lr)))
                if is_due(step + 1, config.eval_every, total_steps):
                    # Gradient-free forwards queued behind this optim_step: they see its weights.
                    current.eval_loss = [client.forward(batch, "cross_entropy")
                                         for batch in held_out.batches]
                # 2. Await the previous step (the engine meanwhile works on this one); log it.
                if previous is not None:
                    log.write(await_step(previous, run_dir, timer))
                # 3. Sample from a snapshot of the weights after this step (waits for it).
                if is_due(step + 1, config.sample_eval_every, total_steps):
                    current.evaluations.update(sample_evaluations(client, held_out, config,
                                                                  console))
                # 4. Before a checkpoint, await this step too, so it is checked and logged first.
                if config.save_every and (step + 1) % config.save_every == 0 \
                        and step + 1 < total_steps:
                    log.write(await_step(current, run_dir, timer))
                    save_checkpoint(client, run_dir, step + 1, epoch)
                    previous = None
                else:
                    previous = current
            if previous is not None:  # the last step, unless a checkpoint awaited it already
                log.write(await_step(previous, run_dir, timer))
        final_checkpoint = save_checkpoint(client, run_dir, total_steps,
                                           (total_steps - 1) // per_epoch)
        wall = time.perf_counter() - started
        exported = export_final(final_checkpoint, run_dir, config, console)
        plot_loss_curve(run_dir)
        summary = write_summary(console, run_dir, total_steps - start_step, wall,
                                final_checkpoint, exported, engines.backend_of(config))
        trackers.summarize(summary, total_steps)
    return TrainResult(run_dir, final_checkpoint, total_steps, log.losses)


@dataclass
class PendingStep:
    """An optimizer step submitted to the engine whose results are not awaited yet.

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


def await_step(pending: PendingStep, run_dir: Path, timer: StepTimer) -> StepRecord:
    """Await a submitted step, check it is finite, time it, then await its held-out loss.

    Divergence is a non-finite number only: a NaN/inf loss, a gradient norm the engine reports
    as NaN/inf (``grad_norm`` in the optimizer step's metrics), or an optimizer step the engine
    skipped for one (:class:`~tinkerkit.errors.NonFiniteGradientError`). Any other failure of
    the step (a lost connection, a server error) is reported as what it is. Nothing of a failed
    step is logged or saved, so the last checkpoint stays the latest in ``checkpoints.jsonl``.

    Args:
        pending: The submitted step.
        run_dir: The run directory (errors name its last checkpoint).
        timer: Lapped once the step's ``optim_step`` is done, before the held-out forwards
            queued behind it are awaited.

    Returns:
        The step's record: its loss, seconds and evaluations (``eval_loss`` is the held-out
        chunks' ``loss:sum`` summed, which their weights make the mean NLL per weighted token).

    Raises:
        TrainingDivergedError: The step diverged (see above).
        EngineError: The engine failed the step for another reason; the message names the step
            and the checkpoint to resume from.
    """
    step = pending.step + 1
    try:
        loss = float(pending.forward_backward.result().metrics["loss:sum"])
        if not math.isfinite(loss):
            raise divergence_error(run_dir, step, f"the training loss is {loss}")
        optimized = pending.optim_step.result()
    except NonFiniteGradientError as e:
        raise divergence_error(run_dir, step, f"the optimizer step was refused ({e})") from e
    except TrainingDivergedError:
        raise
    except EngineError as e:
        raise EngineError(f"step {step}: {e}; "
                          f"{stopped_message(run_dir, 'once the cause is fixed, ')}") from e
    grad_norm = (getattr(optimized, "metrics", None) or {}).get("grad_norm")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise divergence_error(run_dir, step, f"the gradient norm is {grad_norm}")
    seconds = timer.lap()
    evaluations = {}
    if pending.eval_loss:
        evaluations["eval_loss"] = sum(float(f.result().metrics["loss:sum"])
                                       for f in pending.eval_loss)
    return StepRecord(step, pending.epoch + 1, loss, pending.lr, pending.weighted, pending.tokens,
                      seconds, {**evaluations, **pending.evaluations})


def divergence_error(run_dir: Path, step: int, what: str) -> TrainingDivergedError:
    """The one-line error of a NaN/inf step (1-based ``step``), naming the last good checkpoint."""
    return TrainingDivergedError(f"step {step}: {what}; " + stopped_message(
        run_dir, "lower LEARNING_RATE or check the data, then "))
