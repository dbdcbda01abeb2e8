"""The metric log of a run: ``metrics.jsonl``, the progress bar, the loss plot and the summary.

Each completed optimizer step is one line of ``metrics.jsonl``::

    {"step": 3, "epoch": 1, "loss": 1.25, "lr": 0.0002, "weighted_tokens": 412,
     "total_tokens": 1630, "seconds": 0.8123, "eval_loss": 1.31}

``loss`` is the mean NLL per weighted token of the step, ``seconds`` the wall time since the
previous step completed, and ``eval_loss``/``eval_accuracy`` (with a ``GRADER`` file also
``eval_grading_errors``, and ``eval_score`` when it defines ``score``) appear on the steps where
they are due. At the end, ``loss_curve.png`` and ``summary.json`` are drawn from the whole file (a resumed
run's lines included).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from tinkerkit import files
from tinkerkit.export import ExportResult
from tinkerkit.train.run_dir import METRICS_FILE
from tinkerkit.train.trackers import NO_TRACKERS, Trackers


class StepTimer:
    """Wall seconds between consecutive completed steps (the first from the loop's start)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


@dataclass(frozen=True)
class StepRecord:
    """One completed optimizer step, as logged.

    Attributes:
        step: 1-based optimizer step; ``epoch`` 1-based.
        loss: Mean NLL per weighted token of the step (finite).
        lr: Its learning rate.
        weighted_tokens: Weighted tokens of the batch; ``total_tokens`` all its tokens.
        seconds: Wall seconds since the previous step completed.
        evaluations: ``eval_loss`` and ``eval_accuracy`` (and a grader file's
            ``eval_grading_errors`` and ``eval_score``) when due (a value may be None: nothing
            gradable), else empty.
        metrics: The loop's own step metrics, logged before ``seconds`` (``tinkerkit rl``'s
            ``reward_mean``, ``accuracy``, ...; empty for supervised training).
    """

    step: int
    epoch: int
    loss: float
    lr: float
    weighted_tokens: int
    total_tokens: int
    seconds: float
    evaluations: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def line(self) -> dict:
        """The step's line of ``metrics.jsonl`` (in this key order)."""
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr,
                "weighted_tokens": self.weighted_tokens, "total_tokens": self.total_tokens,
                **self.metrics, "seconds": round(self.seconds, 4), **self.evaluations}


def describe_step(record: StepRecord) -> str:
    """The progress bar's text of a supervised step: ``epoch E loss L lr R T tok/s``."""
    return (f"epoch {record.epoch} loss {record.loss:.4f} lr {record.lr:.2e} "
            f"{record.total_tokens / max(record.seconds, 1e-9):.0f} tok/s")


def progress_bar(console: Console) -> Progress:
    """``step N/TOTAL ━━━━ epoch E loss L lr R T tok/s  ETA``, printed to ``console``."""
    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=console, transient=False)


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


@dataclass
class StepLog:
    """Where completed steps go: ``metrics.jsonl``, the progress bar, the loss history.

    Attributes:
        run_dir: The run directory (``metrics.jsonl`` is appended to).
        progress: The progress bar and ``task`` its task; warnings print to its console.
        plateau_window: ``LOSS_PLATEAU_WINDOW`` (0: no plateau check).
        trackers: The experiment trackers (``REPORT_TO``) that receive each line.
        describe: The progress bar's text of a step (:func:`describe_step` for supervised
            training).
        losses: The losses logged by this invocation, in step order.
    """

    run_dir: Path
    progress: Progress
    task: TaskID
    plateau_window: int
    trackers: Trackers = NO_TRACKERS
    describe: Callable[[StepRecord], str] = describe_step
    losses: list[float] = field(default_factory=list)

    def write(self, record: StepRecord) -> None:
        """Append ``record``'s line, send it to the trackers, advance the bar, print its
        evaluations and, when the loss has stopped falling, :func:`plateau_warning`."""
        files.append_jsonl(self.run_dir / METRICS_FILE, record.line())
        self.trackers.log(record.line(), record.step)
        self.losses.append(record.loss)
        self.progress.update(self.task, advance=1, info=self.describe(record))
        if record.evaluations:
            self.progress.console.print(f"step {record.step}: " + "  ".join(
                f"{k} n/a" if v is None else f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                for k, v in record.evaluations.items()))
        warning = plateau_warning(self.losses, self.plateau_window)
        if warning:
            self.progress.console.print(f"[yellow]Warning (step {record.step}): {warning}[/yellow]")


def peak_memory_gib() -> float:
    """Peak resident memory of this process in GiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Draw ``metrics.jsonl`` as ``loss_curve.png`` (training loss, and ``eval_loss`` if logged).

    Returns:
        The PNG's path, or None when no step is logged.
    """
    return plot_curves(run_dir, "loss_curve.png", [("loss", "train loss", "-"),
                                                   ("eval_loss", "eval loss", "o-")],
                       "mean NLL per weighted token")


def plot_curves(run_dir: Path, name: str, series: Sequence[tuple[str, str, str]],
                ylabel: str) -> Path | None:
    """Draw metrics of ``metrics.jsonl`` against the optimizer step as ``run_dir/name`` (PNG).

    Args:
        run_dir: The run directory.
        name: The PNG's file name.
        series: ``(metric, label, matplotlib line style)`` per curve; a metric logged on no step
            is left out (``eval_accuracy`` of a run without it).
        ylabel: The y axis's label.

    Returns:
        The PNG's path, or None when no step is logged.
    """
    # matplotlib is imported here, not at the top: its backend must be chosen before pyplot loads.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = files.read_jsonl(run_dir / METRICS_FILE)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for metric, label, style in series:
        logged = [r for r in records if r.get(metric) is not None]
        if logged:
            ax.plot([r["step"] for r in logged], [r[metric] for r in logged], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = run_dir / name
    files.atomic_write_bytes(path, buffer.getvalue())
    return path


def write_summary(console: Console, run_dir: Path, steps: int, wall: float, checkpoint: str,
                  exported: ExportResult | None, backend: str = "local",
                  extra: dict | None = None) -> dict:
    """Write ``summary.json`` and print it.

    Args:
        console: Where to print.
        run_dir: The run directory (its whole ``metrics.jsonl`` is read).
        steps: Steps this invocation trained (their tokens over ``wall`` give tokens/s).
        wall: Wall seconds of this invocation's loop and final save.
        checkpoint: The final checkpoint (``model_path``).
        exported: The final export, or None.
        backend: The engine (``engines.backend_of``): with ``"tinker"`` the model is on the
            server, so ``peak_memory_gib`` is this client process's alone, and says so.
        extra: More entries, after the loss means (``tinkerkit rl``'s reward means).

    Returns:
        The summary, as written.
    """
    records = files.read_jsonl(run_dir / METRICS_FILE)
    all_losses = [r["loss"] for r in records]
    tokens = sum(r["total_tokens"] for r in records[-steps:]) if steps else 0
    summary = {
        "steps": len(records),
        "first_10_mean_loss": float(np.mean(all_losses[:10])) if all_losses else None,
        "last_10_mean_loss": float(np.mean(all_losses[-10:])) if all_losses else None,
        **(extra or {}),
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "peak_memory_gib": round(peak_memory_gib(), 3),
        "wall_seconds": round(wall, 1),
        "model_path": checkpoint,
    }
    if backend == "tinker":
        summary["peak_memory_of"] = ("this client process only; the model trains on the Tinker "
                                     "server, whose memory is not measured here")
    for name in ("eval_loss", "eval_accuracy", "eval_score"):  # the last value logged, if any
        logged = [r for r in records if name in r]
        if logged:
            summary[f"final_{name}"] = logged[-1][name]
    if exported is not None:
        summary["export_adapter"] = str(exported.adapter_dir)
        if exported.merged_dir is not None:
            summary["export_merged"] = str(exported.merged_dir)
    files.atomic_write_json(run_dir / "summary.json", summary)
    console.print("[bold]Training finished[/bold]")
    for key, value in summary.items():
        console.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return summary
