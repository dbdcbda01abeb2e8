"""Experiment trackers (``REPORT_TO``): TensorBoard, Weights & Biases and MLflow.

Each tracker receives, through its library's own API and under the run's name (the run
directory's name):

* every line of ``metrics.jsonl`` at its ``step`` (``loss``, ``lr``, tokens, ``seconds``,
  ``eval_loss``/``eval_accuracy`` where due; a resumed run first replays the lines it keeps);
* the resolved config (:meth:`TrainConfig.dump`, which holds no secret: the API key is read from
  the environment and never is a field) as hyperparameters;
* the run's summary at the end (``final_eval_loss``, ``tokens_per_second``, ...) and the metrics
  of ``tinkerkit eval`` on the run's checkpoints, prefixed ``eval/``.

Where each one writes:

==============  ===========================================================================
tensorboard     event files in ``RUN_DIR/tensorboard`` (``torch.utils.tensorboard``)
wandb           ``wandb.init``: ``WANDB_PROJECT`` (default ``tinkerkit``), ``WANDB_ENTITY``,
                ``WANDB_MODE`` (``offline`` needs no network), ``WANDB_DIR`` (default RUN_DIR)
mlflow          ``MLFLOW_TRACKING_URI`` (default ``file:RUN_DIR/mlruns``, MLflow's file store,
                allowed with ``MLFLOW_ALLOW_FILE_STORE=true`` unless set otherwise), experiment
                ``MLFLOW_EXPERIMENT_NAME`` (default ``tinkerkit``)
==============  ===========================================================================

The ids of the tracker runs are kept in ``RUN_DIR/trackers.json`` so that ``tinkerkit eval``
adds its metrics to the run that trained the checkpoint.

Example::

    check_trackers(["tensorboard", "mlflow"])          # before the model loads
    with open_trackers(["tensorboard"], run_dir, config.dump()) as trackers:
        trackers.log({"loss": 1.25, "lr": 1e-4}, step=1)
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tinkerkit import files
from tinkerkit.checkpoint import CHECKPOINTS_FILE, checkpoint_path, is_tinker_path
from tinkerkit.errors import ConfigError
from tinkerkit.train.run_dir import CONFIG_FILE

TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
# The module each tracker needs; the extra of the same name installs it.
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# MLflow's limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH since 2.x).
_MLFLOW_PARAM_LENGTH = 6000


def check_trackers(names: Sequence[str]) -> None:
    """Check that the package of every tracker in ``names`` is installed (without importing it).

    Raises:
        ConfigError: A tracker's package is missing; one line naming the extra that installs it.
    """
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"REPORT_TO includes {name!r} but the {_MODULES[name]} package is not "
                              f"installed: pip install 'tinkerkit[{name}]'")


class Tracker(Protocol):
    """One experiment tracker's run."""

    run_id: str

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record numeric ``metrics`` at optimizer ``step``."""

    def summarize(self, metrics: dict[str, float], step: int) -> None:
        """Record values of the whole run (the summary, evaluation results) after ``step``."""

    def close(self, failed: bool) -> None:
        """Flush and end the run (marked failed when ``failed``)."""


def _numbers(line: dict) -> dict[str, float]:
    """The numeric values of a metric line, without its ``step`` (the x axis)."""
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat_params(config: dict) -> dict[str, Any]:
    """Config values as scalar hyperparameters: lists and None as their JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in config.items()}


class TensorBoardTracker:
    """Event files in ``RUN_DIR/tensorboard``; the config as the hparams plugin's session."""

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None) -> None:
        # Imported here: the optional `tensorboard` package is needed only when it is reported to.
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.run_id = run_id or str(run_dir / TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=self.run_id)
        if run_id is None:  # a new run: its hyperparameters (SummaryWriter.add_hparams would
            # write them into a new subdirectory, a second run in TensorBoard's list)
            for summary in hparams(_flat_params(config), {}):  # experiment, session start, end
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    summarize = log

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run directory; W&B's environment variables apply."""

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None) -> None:
        import wandb  # optional package, as above

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tinkerkit",
                              name=run_dir.name, config=config, id=run_id,
                              resume="allow" if run_id else None,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), reinit="create_new")
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summarize(self, metrics: dict[str, float], step: int) -> None:
        # The run's summary, not its history: a resumed W&B run drops a step it has passed.
        self.run.summary.update(metrics)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run named after the run directory, through :class:`mlflow.tracking.MlflowClient`
    (no global active run)."""

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None) -> None:
        from mlflow.entities import Param  # optional package, as above
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default: a directory in the run, no server, no database package.
            # MLflow 3.7+ keeps its file store only on request (MLFLOW_ALLOW_FILE_STORE); the
            # SQLite store would need the full `mlflow` package (SQLAlchemy, Alembic) in the extra.
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tinkerkit"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(name))
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                            tags={"tinkerkit.run_dir": str(run_dir)}).info.run_id
            params = [Param(k, str(v)[:_MLFLOW_PARAM_LENGTH])
                      for k, v in _flat_params(config).items()]
            self.client.log_batch(run_id, params=params)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    summarize = log

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run, as one: :meth:`log` sends to each. A context manager that closes
    them (marking the runs failed when the block raised)."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers

    def log(self, line: dict, step: int) -> None:
        """Send the numeric values of a ``metrics.jsonl`` line at ``step``; None values (nothing
        gradable) are left out."""
        metrics = _numbers(line)
        if metrics:
            for tracker in self.trackers.values():
                tracker.log(metrics, step)

    def summarize(self, line: dict, step: int) -> None:
        """Send the numeric values of a run's summary or evaluation results (see
        :meth:`Tracker.summarize`)."""
        metrics = _numbers(line)
        if metrics:
            for tracker in self.trackers.values():
                tracker.summarize(metrics, step)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run."""
        for tracker in self.trackers.values():
            tracker.close(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


NO_TRACKERS = Trackers({})


def open_trackers(names: Sequence[str], run_dir: Path, config: dict,
                  replay: Sequence[dict] = ()) -> Trackers:
    """Start a run in each tracker of ``names`` and record their ids in ``RUN_DIR/trackers.json``.

    Args:
        names: ``REPORT_TO``: any of :data:`TRACKERS`.
        run_dir: The run directory; its name is the tracker runs' name.
        config: The resolved config (:meth:`TrainConfig.dump`), sent as hyperparameters.
        replay: ``metrics.jsonl`` lines already logged (a resumed run's), sent first.

    Returns:
        The trackers (:data:`NO_TRACKERS` when ``names`` is empty).

    Raises:
        ConfigError: A tracker's package is missing (:func:`check_trackers`).
    """
    if not names:
        return NO_TRACKERS
    check_trackers(names)
    trackers = Trackers({name: _CLASSES[name](run_dir, config) for name in names})
    files.atomic_write_json(run_dir / TRACKERS_FILE,
                            {name: t.run_id for name, t in trackers.trackers.items()})
    for line in replay:
        trackers.log(line, line["step"])
    return trackers


def report_evaluation(checkpoint: str | Path | None, metrics: dict) -> list[str]:
    """Add ``tinkerkit eval`` metrics (prefixed ``eval/``) to the tracker runs that trained
    ``checkpoint``: those in its run directory's ``trackers.json``, at the checkpoint's step.

    Args:
        checkpoint: What ``tinkerkit eval`` was given: a run directory (its latest checkpoint) or
            a checkpoint inside one; anything else (the base model, an exported adapter, a
            ``tinker://`` path) belongs to no run and reports nothing.
        metrics: The evaluation's metrics (non-numeric values are left out).

    Returns:
        The names of the trackers reported to (empty when the run reported to none).

    Raises:
        ConfigError: A tracker's package is missing.
    """
    found = _run_of(checkpoint)
    if found is None:
        return []
    run_dir, step = found
    ids = files.read_json(run_dir / TRACKERS_FILE)
    check_trackers(list(ids))
    config = files.read_json(run_dir / CONFIG_FILE)
    opened = {name: _CLASSES[name](run_dir, config, run_id=run_id) for name, run_id in ids.items()}
    with Trackers(opened) as trackers:
        trackers.summarize({f"eval/{k}": v for k, v in metrics.items()}, step)
    return list(opened)


def _run_of(checkpoint: str | Path | None) -> tuple[Path, int] | None:
    """``(run directory, step)`` of a run directory or of a local checkpoint listed in its run's
    ``checkpoints.jsonl``, when that run reported to trackers; else None."""
    if checkpoint is None or is_tinker_path(checkpoint):
        return None
    path = Path(checkpoint)
    run_dir = path if (path / CHECKPOINTS_FILE).is_file() else path.parent.parent
    if not (run_dir / TRACKERS_FILE).is_file() or not (run_dir / CHECKPOINTS_FILE).is_file():
        return None
    entries = files.read_jsonl(run_dir / CHECKPOINTS_FILE)
    if path == run_dir:
        return (run_dir, entries[-1]["step"]) if entries else None
    steps = [e["step"] for e in entries
             if Path(checkpoint_path(run_dir, e)).resolve() == path.resolve()]
    return (run_dir, steps[-1]) if steps else None
