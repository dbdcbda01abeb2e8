"""Supervised LoRA training: rendered examples -> forward_backward -> optim_step -> checkpoints.

The modules, in the order a run uses them:

* :mod:`~tinkerkit.train.examples` — loading ``DATA_FILES``, rendering, the length guards and the
  per-step loss normalization (:func:`normalize_batch`).
* :mod:`~tinkerkit.train.held_out` — the held-out set of evaluation during training.
* :mod:`~tinkerkit.train.schedule` — which examples and which learning rate each step gets.
* :mod:`~tinkerkit.train.run_dir` — the run directory: fresh-run check, resume, checkpoints,
  the final export.
* :mod:`~tinkerkit.train.metrics` — ``metrics.jsonl``, the progress bar, the loss plot, the summary.
* :mod:`~tinkerkit.train.trackers` — the experiment trackers of ``REPORT_TO`` (TensorBoard, W&B,
  MLflow).
* :mod:`~tinkerkit.train.loop` — :func:`train`, the loop itself.
* :mod:`~tinkerkit.train.dryrun` — :func:`dry_run` (``tinkerkit train --dry-run``).

Every public name is re-exported here, so ``from tinkerkit.train import train, dry_run,
resolve_resume, ...`` is the one import callers need. To replace a name for a test, patch it in the
module that looks it up (``tinkerkit.train.loop.await_step``, not ``tinkerkit.train.await_step``).

Example::

    config = load_config("config.py")
    result = train(config)
    print(result.final_checkpoint)
"""

from tinkerkit.errors import TrainingDivergedError
from tinkerkit.train.dryrun import DryRunReport, dry_run
from tinkerkit.train.examples import (
    LENGTH_ROUNDING,
    length_covering,
    load_examples,
    make_renderer,
    normalize_batch,
    positions_warning,
    split_data,
    truncation_warning,
)
from tinkerkit.train.held_out import HeldOut, load_held_out, sample_evaluations
from tinkerkit.train.loop import PendingStep, TrainResult, await_step, divergence_error, train
from tinkerkit.train.metrics import (
    StepLog,
    StepRecord,
    StepTimer,
    describe_step,
    peak_memory_gib,
    plateau_warning,
    plot_curves,
    plot_loss_curve,
    progress_bar,
    write_summary,
)
from tinkerkit.train.run_dir import (
    CONFIG_FILE,
    EXPORT_DIR,
    METRICS_FILE,
    RunStart,
    check_new_run_dir,
    config_for_resume,
    default_run_dir,
    export_final,
    interrupt_names_checkpoint,
    open_client,
    refuse_other_run_dir,
    resolve_resume,
    save_checkpoint,
    start_run,
    truncate_logs,
)
from tinkerkit.train.schedule import (
    adam_params,
    batch_indices,
    batches_per_epoch,
    is_due,
    learning_rate_at,
    plan_steps,
)
from tinkerkit.train.trackers import (
    TRACKERS,
    Trackers,
    check_evaluation_trackers,
    check_trackers,
    open_trackers,
    report_evaluation,
)

__all__ = [
    "CONFIG_FILE", "EXPORT_DIR", "LENGTH_ROUNDING", "METRICS_FILE",
    "DryRunReport", "HeldOut", "PendingStep", "RunStart", "StepLog", "StepRecord", "StepTimer",
    "TRACKERS", "Trackers", "TrainResult", "TrainingDivergedError",
    "adam_params", "await_step", "batch_indices", "batches_per_epoch", "check_new_run_dir",
    "check_evaluation_trackers", "check_trackers", "config_for_resume", "default_run_dir",
    "describe_step", "divergence_error", "dry_run", "export_final", "interrupt_names_checkpoint",
    "is_due", "learning_rate_at", "length_covering", "load_examples", "load_held_out",
    "make_renderer", "normalize_batch", "open_client", "open_trackers", "peak_memory_gib", "plan_steps",
    "plateau_warning", "plot_curves", "plot_loss_curve", "positions_warning", "progress_bar", "refuse_other_run_dir",
    "report_evaluation", "resolve_resume", "sample_evaluations",
    "save_checkpoint", "split_data", "start_run", "train", "truncate_logs", "truncation_warning",
    "write_summary",
]
