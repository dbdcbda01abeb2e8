"""Experiment trackers (``REPORT_TO``): TensorBoard, Weights & Biases and MLflow.

Each tracker receives, through its library's own API and under the run's name (the run
directory's name):

* every line of ``metrics.jsonl`` at its ``step`` (``loss``, ``lr``, tokens, ``seconds``,
  ``eval_loss``/``eval_accuracy`` where due), each step exactly once (see Resume below);
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
adds its metrics to the run that trained the checkpoint, and ``--resume`` continues them.

Usability is checked before the model loads (:func:`check_trackers`): the package, W&B's API key
(unless ``WANDB_MODE`` is ``offline`` or ``disabled``), MLflow's ``MLFLOW_TRACKING_URI``. When a
tracker fails to start or to record, or the run fails, every tracker run already started ends as
failed (MLflow ``FAILED``, W&B exit code 1), never left ``RUNNING``.

Resume: a resumed run continues the tracker runs of ``trackers.json`` (the same MLflow run, set
``RUNNING`` again; the same W&B run, ``resume="allow"``; the same TensorBoard directory) and sends
each tracker only the steps after the last one it holds: TensorBoard's and MLflow's own record
(the event files, the ``loss`` history), W&B's the last step of ``metrics.jsonl`` before the
resume. A step logged before the run stopped and trained again after the resume keeps its first
values there (the same ones, as resume is exact, except ``seconds``); ``metrics.jsonl`` holds the
new ones. A tracker added to ``REPORT_TO`` at the resume starts a run and first gets the kept
lines.

Example::

    check_trackers(["tensorboard", "mlflow"])          # before the model loads
    with open_trackers(["tensorboard"], run_dir, config.dump()) as trackers:
        trackers.log({"loss": 1.25, "lr": 1e-4}, step=1)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tinkerkit import files
from tinkerkit.checkpoint import CHECKPOINTS_FILE, checkpoint_path, is_tinker_path
from tinkerkit.config import without_userinfo
from tinkerkit.errors import ConfigError, TrackerError
from tinkerkit.train.run_dir import CONFIG_FILE

TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
# The module each tracker needs; the extra of the same name installs it.
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# MLflow's limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH since 2.x).
_MLFLOW_PARAM_LENGTH = 6000


def check_trackers(names: Sequence[str]) -> None:
    """Check, before the model loads, that every tracker in ``names`` can start its run.

    The package of each must be installed (found without importing it). W&B, unless
    ``WANDB_MODE`` is ``offline`` or ``disabled``, needs an API key: ``wandb.login`` finds it
    in ``WANDB_API_KEY``, W&B's settings or ``~/.netrc`` without contacting the server (and asks
    for it at a terminal). MLflow with ``MLFLOW_TRACKING_URI`` set must reach its store there
    (the default store is a directory of the run: nothing to check).

    Raises:
        ConfigError: A tracker cannot start; one line naming what to install or to set.
    """
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"REPORT_TO includes {name!r} but the {_MODULES[name]} package is not "
                              f"installed: pip install 'tinkerkit[{name}]'")
    if "wandb" in names:
        _check_wandb()
    if "mlflow" in names and os.environ.get("MLFLOW_TRACKING_URI"):
        _check_mlflow(os.environ["MLFLOW_TRACKING_URI"])


def _check_wandb() -> None:
    """W&B's credentials, where its mode needs them (:func:`check_trackers`)."""
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled"):
        return
    # Imported here: the optional `wandb` package is needed only when it is reported to.
    import wandb
    from wandb.errors import AuthenticationError, UsageError

    try:
        wandb.login(verify=False)  # no request to the server: wandb.init verifies the key
    except (UsageError, AuthenticationError) as e:  # W&B's messages never hold the key
        raise ConfigError(f"REPORT_TO includes 'wandb' but W&B has no usable API key ({e}): set "
                          "WANDB_API_KEY or run `wandb login`, or set WANDB_MODE=offline to log "
                          "without an account") from None


def _check_mlflow(uri: str) -> None:
    """That MLflow's store at ``uri`` answers (:func:`check_trackers`)."""
    from mlflow.exceptions import MlflowException  # optional package, as above
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(_mlflow_experiment())
    except MlflowException as e:
        raise ConfigError(f"REPORT_TO includes 'mlflow' but MLflow's store at "
                          f"MLFLOW_TRACKING_URI={without_userinfo(uri)} does not answer: "
                          f"{_first_line(e.message)}; start its server, or unset "
                          "MLFLOW_TRACKING_URI to log into RUN_DIR/mlruns") from None


# user:password@ in the URLs of MLflow's messages (the tracking URI may carry credentials)
_USERINFO = re.compile(r"://[^/\s@]+@")


def _mlflow_experiment() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tinkerkit"


def _first_line(text: object) -> str:
    """The first line of a library's message, without the credentials of any URL in it."""
    return _USERINFO.sub("://***@", " ".join(str(text).split("\n")[0].split()))


class Tracker(Protocol):
    """One experiment tracker's run.

    Made as ``Tracker(run_dir, config, run_id=None, resume=False)``: a new run (``run_id``
    None), the run ``run_id`` continued by a resumed training (``resume``: it is running again
    and ends with the run), or the run ``run_id`` given values after its training
    (``tinkerkit eval``: its status is left as it is where the tracker has one).
    """

    run_id: str

    def held_step(self) -> int | None:
        """The last step the run holds (0: none), from the tracker's own record; None when the
        tracker cannot tell (the caller then knows from ``metrics.jsonl``)."""

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

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None,
                 resume: bool = False) -> None:
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

    def held_step(self) -> int | None:
        # What the event files hold (a killed run loses the events still in the writer's queue,
        # so metrics.jsonl's last step may be later); read with TensorBoard's own reader.
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(self.run_id, size_guidance={"scalars": 0})
        events.Reload()
        return max((event.step for tag in events.Tags()["scalars"]
                    for event in events.Scalars(tag)), default=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    summarize = log

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run directory; W&B's environment variables apply."""

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None,
                 resume: bool = False) -> None:
        import wandb  # optional package, as above

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "tinkerkit",
                              name=run_dir.name, config=config, id=run_id,
                              resume="allow" if run_id else None,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), reinit="create_new")
        self.run_id = self.run.id

    def held_step(self) -> int | None:
        return None  # offline, W&B cannot know what an earlier process logged

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

    def __init__(self, run_dir: Path, config: dict, run_id: str | None = None,
                 resume: bool = False) -> None:
        from mlflow.entities import Param  # optional package, as above
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the default: a directory in the run, no server, no database package.
            # MLflow 3.7+ keeps its file store only on request (MLFLOW_ALLOW_FILE_STORE); the
            # SQLite store would need the full `mlflow` package (SQLAlchemy, Alembic) in the extra.
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.ends_run = run_id is None or resume  # tinkerkit eval leaves the status alone
        if run_id is None:
            experiment = self.client.get_experiment_by_name(_mlflow_experiment())
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(_mlflow_experiment()))
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                            tags={"tinkerkit.run_dir": str(run_dir)}).info.run_id
            params = [Param(k, str(v)[:_MLFLOW_PARAM_LENGTH])
                      for k, v in _flat_params(config).items()]
            self.client.log_batch(run_id, params=params)
        elif resume:  # the stopped run (FAILED, or RUNNING if killed) runs again
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def held_step(self) -> int | None:
        return max((m.step for m in self.client.get_metric_history(self.run_id, "loss")),
                   default=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    summarize = log

    def close(self, failed: bool) -> None:
        if self.ends_run:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run, as one: :meth:`log` sends to each. A context manager that closes
    them (marking the runs failed when the block raised).

    Args:
        trackers: The open trackers by name.
        held: The last step each one already holds (a resumed run's): :meth:`log` sends it only
            later steps. Missing: 0.
    """

    def __init__(self, trackers: dict[str, Tracker], held: dict[str, int] | None = None) -> None:
        self.trackers = trackers
        self.held = held if held is not None else {}

    def log(self, line: dict, step: int) -> None:
        """Send the numeric values of a ``metrics.jsonl`` line at ``step`` to each tracker that
        does not hold that step yet; None values (nothing gradable) are left out.

        Raises:
            TrackerError: A tracker failed to record them (its name and the step in the message).
        """
        metrics = _numbers(line)
        for name, tracker in self.trackers.items():
            if metrics and step > self.held.get(name, 0):
                _calling(name, f"record step {step}", tracker.log, metrics, step)

    def summarize(self, line: dict, step: int) -> None:
        """Send the numeric values of a run's summary or evaluation results (see
        :meth:`Tracker.summarize`).

        Raises:
            TrackerError: A tracker failed to record them.
        """
        metrics = _numbers(line)
        for name, tracker in self.trackers.items():
            if metrics:
                _calling(name, "record the summary", tracker.summarize, metrics, step)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run (each one, even when another fails to end).

        Raises:
            TrackerError: A tracker failed to end its run (after every other one was ended).
        """
        problems = []
        for name, tracker in self.trackers.items():
            try:
                _calling(name, "end its run", tracker.close, failed)
            except TrackerError as e:
                problems.append(str(e))
        if problems:
            raise TrackerError("; ".join(problems))

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self.close(failed=kind is not None)
        except TrackerError:
            if kind is None:  # the block's own error, if any, is the one to report
                raise


NO_TRACKERS = Trackers({})


def _calling(name: str, action: str, fn, *args: Any) -> Any:
    """``fn(*args)``, a library's failure as a one-line :class:`TrackerError` naming the tracker."""
    try:
        return fn(*args)
    except Exception as e:
        raise TrackerError(f"REPORT_TO: {name} could not {action}: {type(e).__name__}: "
                           f"{_first_line(e)}") from e


def open_trackers(names: Sequence[str], run_dir: Path, config: dict, kept: Sequence[dict] = (),
                  logged_through: int | None = None) -> Trackers:
    """Start a run in each tracker of ``names`` (or continue it, when resuming) and record their
    ids in ``RUN_DIR/trackers.json``.

    Args:
        names: ``REPORT_TO``: any of :data:`TRACKERS`.
        run_dir: The run directory; its name is the tracker runs' name.
        config: The resolved config (:meth:`TrainConfig.dump`), sent as hyperparameters.
        kept: A resumed run's ``metrics.jsonl`` lines (up to its checkpoint): a tracker gets
            those after the last step it holds (all of them when it starts a run).
        logged_through: A resumed run's last step in ``metrics.jsonl`` before the resume (what
            its trackers were sent); None for a new run.

    Returns:
        The trackers (:data:`NO_TRACKERS` when ``names`` is empty).

    Raises:
        ConfigError: A tracker's package is missing (:func:`check_trackers`).
        TrackerError: A tracker failed to start or to record; those already started were ended
            as failed.
    """
    if not names:
        return NO_TRACKERS
    check_trackers(names)
    previous = _tracker_ids(run_dir) if logged_through is not None else {}
    trackers = Trackers({}, {})
    try:
        for name in names:
            run_id = previous.get(name)
            tracker = _calling(name, "start its run", _CLASSES[name], run_dir, config, run_id,
                               run_id is not None)
            trackers.trackers[name] = tracker
            if run_id is not None:
                held = _calling(name, "read the steps it holds", tracker.held_step)
                trackers.held[name] = logged_through if held is None else held
        files.atomic_write_json(run_dir / TRACKERS_FILE, {
            **previous, **{name: t.run_id for name, t in trackers.trackers.items()}})
        for line in kept:
            trackers.log(line, line["step"])
    except BaseException:
        with contextlib.suppress(TrackerError):
            trackers.close(failed=True)
        raise
    return trackers


def _tracker_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids of ``RUN_DIR/trackers.json`` (none when the run reported to none)."""
    path = run_dir / TRACKERS_FILE
    return files.read_json(path) if path.is_file() else {}


def check_evaluation_trackers(checkpoint: str | Path | None) -> None:
    """:func:`check_trackers` for the trackers that :func:`report_evaluation` will send the
    metrics of ``checkpoint`` to; called before the evaluation runs, so that a tracker that
    cannot start fails it in seconds, not after the sampling.

    Raises:
        ConfigError: One of them cannot start.
    """
    found = _run_of(checkpoint)
    if found is not None:
        check_trackers(list(_tracker_ids(found[0])))


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
        ConfigError: A tracker cannot start (:func:`check_trackers`).
        TrackerError: A tracker failed to open the run or to record the metrics.
    """
    found = _run_of(checkpoint)
    if found is None:
        return []
    run_dir, step = found
    ids = _tracker_ids(run_dir)
    check_trackers(list(ids))
    config = files.read_json(run_dir / CONFIG_FILE)
    with Trackers({}) as trackers:
        for name, run_id in ids.items():
            trackers.trackers[name] = _calling(name, "open its run", _CLASSES[name], run_dir,
                                               config, run_id)
        trackers.summarize({f"eval/{k}": v for k, v in metrics.items()}, step)
    return list(ids)


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
