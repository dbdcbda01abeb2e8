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

Example::

    config = load_config("config.py")
    result = train(config)
    print(result.final_checkpoint)
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
import tinker
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tinkerkit import io
from tinkerkit.config import LRSchedule, TrainConfig, build_config
from tinkerkit.data.formats import load_conversations
from tinkerkit.errors import CheckpointError, ConfigError, DataError
from tinkerkit.models import load_tokenizer
from tinkerkit.render import RenderedExample, Renderer, print_render_stats

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CONFIG_FILE = "config.json"


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


def peak_memory_gib() -> float:
    """Peak resident memory of this process in GiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- run directory and resume -------------------------------------------------------------------

def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def latest_checkpoint(run_dir: Path) -> dict:
    """The newest complete checkpoint listed in ``run_dir/checkpoints.jsonl``.

    Raises:
        CheckpointError: None is listed, or none of those listed is complete on disk.
    """
    from tinkerkit.checkpoint import read_checkpoint_meta

    entries = io.read_jsonl(run_dir / CHECKPOINTS_FILE)
    for entry in reversed(entries):
        try:
            read_checkpoint_meta(entry["path"])
            return entry
        except CheckpointError:
            continue
    raise CheckpointError(f"{run_dir}: no complete checkpoint in {CHECKPOINTS_FILE}")


def resolve_resume(path: str | Path) -> tuple[Path, dict]:
    """Find the run directory and ``checkpoints.jsonl`` entry of ``--resume PATH``.

    Args:
        path: A run directory (its latest checkpoint) or a checkpoint directory inside one.

    Raises:
        CheckpointError: Not a run directory or a checkpoint listed in one.
    """
    path = Path(path)
    if (path / CHECKPOINTS_FILE).is_file():
        return path, latest_checkpoint(path)
    run_dir = path.parent.parent
    for entry in io.read_jsonl(run_dir / CHECKPOINTS_FILE):
        if Path(entry["path"]).resolve() == path.resolve():
            from tinkerkit.checkpoint import read_checkpoint_meta
            read_checkpoint_meta(path)
            return run_dir, entry
    raise CheckpointError(f"--resume {path}: not a run directory or a checkpoint listed in "
                          f"a run's {CHECKPOINTS_FILE} (use --init-from to start a new stage)")


def config_for_resume(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved in a run directory, with ``overrides`` (lower-case fields) applied."""
    try:
        saved = io.read_json(run_dir / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: cannot read the run's config: {e}") from e
    values = {k.lower(): v for k, v in saved.items()}
    values.update(overrides or {})
    return build_config(values)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop metric and checkpoint lines after ``step`` so every step is logged exactly once."""
    for name in (METRICS_FILE, CHECKPOINTS_FILE):
        records = io.read_jsonl(run_dir / name)
        io.rewrite_jsonl(run_dir / name, [r for r in records if r["step"] <= step])


# -- the loop -----------------------------------------------------------------------------------

def load_examples(config: TrainConfig, tokenizer, console: Console) -> list[RenderedExample]:
    """Load, normalize and render the training data, printing the statistics.

    Raises:
        DataError: No example survives rendering (or a record is bad with ``ON_ERROR=raise``).
    """
    if not config.data_files:
        raise ConfigError("DATA_FILES is empty: name at least one training file")
    loaded = load_conversations(config.data_files, format=config.data_format,
                                on_error=config.on_error)
    renderer = Renderer(tokenizer, config.train_on, config.max_sequence_length,
                        config.truncate_long_sequences)
    examples, stats = renderer.render_dataset(loaded.conversations)
    print_render_stats(stats, console, config.max_sequence_length, skipped_records=loaded.skipped)
    if config.on_error == "raise" and stats.failed:
        source, reason = next((s, r) for s, r in stats.reasons if s)
        raise DataError(f"{reason} (set ON_ERROR=skip to skip such records)", path=source)
    if not examples:
        raise DataError("no training example left after rendering (see the statistics above)")
    return examples


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
        init_from: A checkpoint whose weights start a new stage with a fresh optimizer and schedule.
        console: Where to print (default: a new rich console).

    Returns:
        The :class:`TrainResult`.

    Raises:
        ConfigError, DataError, ModelError, CheckpointError: Bad settings, data or checkpoints.
    """
    from tinkerkit.engines import create_training_client

    console = console or Console()
    start_step = 0
    if resume:
        run_dir, entry = resolve_resume(resume)
        start_step = entry["step"]
    run_dir = Path(run_dir or config.run_dir or default_run_dir())
    # Data first: a bad file fails in seconds, before the model is loaded.
    examples = load_examples(config, load_tokenizer(config.base_model), console)
    if config.batch_size > len(examples):
        raise ConfigError(f"BATCH_SIZE={config.batch_size} is larger than the {len(examples)} "
                          "training examples; lower it or add data")
    client = create_training_client(config, run_dir / "checkpoints",
                                    state=entry["path"] if resume else init_from,
                                    with_optimizer=bool(resume))
    per_epoch = batches_per_epoch(len(examples), config.batch_size)
    total_steps = min(config.max_steps or per_epoch * config.num_epochs, per_epoch * config.num_epochs)
    if resume:
        truncate_logs(run_dir, start_step)
        console.print(f"Resuming {run_dir} from step {start_step} ({entry['path']})")
    io.atomic_write_json(run_dir / CONFIG_FILE, config.dump())
    console.print(f"Training {total_steps} steps ({per_epoch} per epoch, batch {config.batch_size}) "
                  f"in {run_dir}")

    losses: list[float] = []
    pending = None
    last_checkpoint = entry["path"] if resume else None
    started = time.perf_counter()
    timer = StepTimer()
    with _progress(console) as progress:
        task = progress.add_task("train", total=total_steps, completed=start_step, info="")
        for step in range(start_step, total_steps):
            epoch, indices = batch_indices(step, len(examples), config.batch_size, config.seed)
            datums, weighted, tokens = normalize_batch([examples[i] for i in indices])
            lr = learning_rate_at(step, total_steps, config)
            # Submit this step before awaiting the previous one (the SDK's pipelining).
            submitted = (step, epoch, lr, weighted, tokens,
                         client.forward_backward(datums, "cross_entropy"),
                         client.optim_step(adam_params(config, lr)))
            if pending is not None:
                losses.append(_record(pending, run_dir, progress, task, timer))
            pending = submitted
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                losses.append(_record(pending, run_dir, progress, task, timer))
                pending = None
                last_checkpoint = _save(client, run_dir, step + 1, epoch)
        if pending is not None:
            losses.append(_record(pending, run_dir, progress, task, timer))
    if total_steps > start_step or last_checkpoint is None:
        last_checkpoint = _save(client, run_dir, total_steps, (total_steps - 1) // per_epoch)
    wall = time.perf_counter() - started
    plot_loss_curve(run_dir)
    _summarize(console, run_dir, losses, total_steps - start_step, wall, last_checkpoint)
    return TrainResult(run_dir, last_checkpoint, total_steps, losses)


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


def _record(pending: tuple, run_dir: Path, progress: Progress, task, timer: StepTimer) -> float:
    step, epoch, lr, weighted, tokens, fb_future, optim_future = pending
    loss = float(fb_future.result().metrics["loss:sum"])
    optim_future.result()
    seconds = timer.lap()
    io.append_jsonl(run_dir / METRICS_FILE, {
        "step": step + 1, "epoch": epoch + 1, "loss": loss, "lr": lr,
        "weighted_tokens": weighted, "total_tokens": tokens, "seconds": round(seconds, 4)})
    progress.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss:.4f} lr {lr:.2e} "
                                          f"{tokens / max(seconds, 1e-9):.0f} tok/s")
    return loss


def _save(client, run_dir: Path, step: int, epoch: int) -> str:
    path = client.save_state(f"step_{step:06d}").result().path
    io.append_jsonl(run_dir / CHECKPOINTS_FILE, {"step": step, "epoch": epoch + 1, "path": path,
                                                "kind": "state"})
    return path


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


def _summarize(console: Console, run_dir: Path, losses: list[float], steps: int, wall: float,
               checkpoint: str) -> None:
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
    io.atomic_write_json(run_dir / "summary.json", summary)
    console.print("[bold]Training finished[/bold]")
    for key, value in summary.items():
        console.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
