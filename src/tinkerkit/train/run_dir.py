"""The run directory: its files, the fresh-run check, resume, checkpoints and the final export.

A run directory holds ``config.json`` (the resolved settings), ``metrics.jsonl`` (one line per
optimizer step, see :mod:`tinkerkit.train.metrics`), ``checkpoints.jsonl`` (one line per saved
state, its ``path`` relative to the run directory when inside it), ``checkpoints/step_NNNNNN/``
and, with ``EXPORT_AFTER_TRAINING``, ``export/``. ``--resume RUN_DIR`` continues from the latest
checkpoint listed; the lines logged after it are dropped so every step is logged exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console

from tinkerkit import engines, files
from tinkerkit.checkpoint import (
    CHECKPOINTS_FILE,
    checkpoint_path,
    is_tinker_path,
    latest_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from tinkerkit.config import TrainConfig, build_config
from tinkerkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    TrainingInterrupted,
    plural,
)
from tinkerkit.export import ExportResult, export_checkpoint

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EXPORT_DIR = "export"

_NOTHING_TO_RESUME = "stopped before its first checkpoint, so there is nothing to resume"


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


def _lists_no_checkpoint(run_dir: Path) -> bool:
    """Whether ``checkpoints.jsonl`` is missing or empty (a damaged file lists something:
    ``--resume`` then names the damage)."""
    try:
        return not files.read_jsonl(run_dir / CHECKPOINTS_FILE)
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
    for entry in files.read_jsonl(run_dir / CHECKPOINTS_FILE):
        if Path(checkpoint_path(run_dir, entry)).resolve() == path.resolve():
            read_checkpoint_meta(path)
            return run_dir, {**entry, "path": str(path)}
    raise CheckpointError(f"--resume {path}: not a run directory or a checkpoint listed in "
                          f"a run's {CHECKPOINTS_FILE} (use --init-from to start a new stage)")


def _saves(run_dir: Path) -> str:
    """`` (it saves every N steps: SAVE_EVERY=N)`` from a run's saved config, or ``""``."""
    try:
        every = files.read_json(run_dir / CONFIG_FILE).get("SAVE_EVERY")
    except (OSError, ValueError, AttributeError):
        return ""
    if every == 0:
        return " (it saves only at its last step: SAVE_EVERY=0)"
    if not isinstance(every, int):
        return ""
    return f" (it saves every {'step' if every == 1 else plural(every, 'step')}: SAVE_EVERY={every})"


def config_for_resume(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved in a run directory, with ``overrides`` (lower-case fields) applied.

    ``RUN_DIR`` is the directory the run is in now (it may have been moved since it was saved);
    an override of it is refused by :func:`refuse_other_run_dir` when training starts.

    Raises:
        ConfigError: ``config.json`` cannot be read, or the settings are invalid.
    """
    try:
        saved = files.read_json(run_dir / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: cannot read the run's config: {e}") from e
    values = {**{k.lower(): v for k, v in saved.items()}, "run_dir": str(run_dir)}
    origins = dict.fromkeys(values, str(run_dir / CONFIG_FILE))
    values.update(overrides or {})
    origins.update(dict.fromkeys(overrides or {}, "the command line"))
    return build_config(values, origins)


def refuse_other_run_dir(given: str | Path | None, resumed: Path, setting: str = "--run-dir"
                         ) -> None:
    """Refuse a run directory (``--run-dir``, or the ``RUN_DIR`` setting from ``--set`` or a
    config file) that is not the directory of the run being resumed.

    A resumed run continues in its own directory: its checkpoints, ``metrics.jsonl`` and config
    are there, and a second directory would split one run's history in two. (To start a new run
    from a checkpoint's weights elsewhere, ``--init-from`` takes a ``--run-dir``.)

    Args:
        given: The directory asked for (None: none).
        resumed: The run's directory.
        setting: How it was asked for: ``--run-dir`` or ``RUN_DIR``.

    Raises:
        ConfigError: ``given`` is set and is another directory than ``resumed``.
    """
    if given is not None and Path(given).resolve() != Path(resumed).resolve():
        where = "--run-dir " if setting == "--run-dir" else "RUN_DIR="
        raise ConfigError(f"{where}{given}: --resume continues the run in its own directory "
                          f"{resumed}; drop {setting}, or start a new run from its weights with "
                          f"--init-from {resumed} --run-dir {given}")


def truncate_logs(run_dir: Path, step: int) -> tuple[list[dict], int]:
    """Drop metric and checkpoint lines after ``step`` so every step is logged exactly once.

    Returns:
        The ``metrics.jsonl`` lines kept, and the last step it held before (0: none), which is
        what the run's trackers were sent.
    """
    logged = files.read_jsonl(run_dir / METRICS_FILE)
    for name in (METRICS_FILE, CHECKPOINTS_FILE):
        records = logged if name == METRICS_FILE else files.read_jsonl(run_dir / name)
        files.rewrite_jsonl(run_dir / name, [r for r in records if r["step"] <= step])
    return [r for r in logged if r["step"] <= step], max((r["step"] for r in logged), default=0)


@dataclass(frozen=True)
class RunStart:
    """Where a run (``train`` or ``rl``) starts: a fresh run directory, or a resumed one.

    Attributes:
        run_dir: The run directory.
        start_step: Optimizer steps already done (0 for a fresh run).
        resumed: The ``checkpoints.jsonl`` entry resumed from (its ``path`` resolved), or None.
        init_from: The checkpoint whose weights start a new stage (resolved), or None.
    """

    run_dir: Path
    start_step: int = 0
    resumed: dict | None = None
    init_from: str | None = None

    def finished(self, total_steps: int, console: Console) -> bool:
        """Whether the run has done all ``total_steps`` already (a resumed finished run); says
        so on ``console``."""
        if self.start_step < total_steps:
            return False
        console.print(f"{self.run_dir} has finished: it is at step {self.start_step} of "
                      f"{total_steps}; nothing to do (raise MAX_STEPS or NUM_EPOCHS to train "
                      "further)")
        return True

    @property
    def state(self) -> str | None:
        """The checkpoint the engine loads: the resumed one, else ``init_from``."""
        return self.resumed["path"] if self.resumed else self.init_from


RL_METRIC = "reward_mean"
"""A key every ``metrics.jsonl`` line of an RL run has and a supervised run's lines lack."""


def start_run(config: TrainConfig, run_dir: str | Path | None, resume: str | None,
              init_from: str | None, rl: bool = False) -> RunStart:
    """Check ``--run-dir``, ``--resume`` and ``--init-from`` before any work starts.

    ``rl`` says which command asks: ``tinkerkit rl`` resumes RL runs only, ``tinkerkit train``
    supervised runs only (one run's ``metrics.jsonl`` holds one kind of step).

    Raises:
        ConfigError: A fresh run's directory already holds a run, ``--run-dir`` or
            ``RUN_DIR`` is not the resumed run's, or the resumed run is of the other kind.
        CheckpointError: ``--resume`` or ``--init-from`` names no usable checkpoint.
    """
    if resume:
        resumed_dir, entry = resolve_resume(resume)
        refuse_other_run_dir(run_dir, resumed_dir)
        refuse_other_run_dir(config.run_dir, resumed_dir, "RUN_DIR")  # --set or a config file
        logged = files.read_jsonl(resumed_dir / METRICS_FILE)
        if logged and (RL_METRIC in logged[0]) != rl:
            kind, command = ("a supervised", "rl") if rl else ("an RL", "train")
            raise ConfigError(f"{resumed_dir} is {kind} run: `tinkerkit {command} --resume` "
                              f"continues {command} runs only; start a new {command} stage from "
                              f"its weights with --init-from {resumed_dir} --run-dir NEW_DIR")
        return RunStart(resumed_dir, entry["step"], entry)
    run_dir = Path(run_dir or config.run_dir or default_run_dir())
    check_new_run_dir(run_dir)
    return RunStart(run_dir, init_from=resolve_checkpoint(init_from) if init_from else None)


def open_client(config: TrainConfig, start: RunStart, console: Console
                ) -> tuple[object, dict, list[dict], int | None]:
    """The engine's training client at ``start`` (weights and, resuming, the AdamW state);
    a resumed run's logs cut back to its checkpoint; ``config.json`` written.

    Returns:
        The training client; the resolved config as written (UPPERCASE keys); for a resumed
        run the ``metrics.jsonl`` lines kept and the last step logged before the cut (what the
        run's trackers already hold: :func:`tinkerkit.train.trackers.open_trackers`), else
        ``[]`` and None.

    Raises:
        CheckpointError, EngineError, ModelError: As
            :func:`tinkerkit.engines.create_training_client` says.
    """
    client = engines.create_training_client(config, start.run_dir / "checkpoints",
                                            state=start.state,
                                            with_optimizer=start.resumed is not None)
    kept, logged_through = [], None
    if start.resumed:
        kept, logged_through = truncate_logs(start.run_dir, start.start_step)
        console.print(f"Resuming {start.run_dir} from step {start.start_step} "
                      f"({start.resumed['path']})")
        for reason in start.resumed.get("skipped", []):
            console.print(f"skipped the newer {reason}; the steps after {start.start_step} are "
                          "trained and saved again")
    resolved = config.model_copy(update={"run_dir": str(start.run_dir)}).dump()
    files.atomic_write_json(start.run_dir / CONFIG_FILE, resolved)
    return client, resolved, kept, logged_through


def save_checkpoint(client, run_dir: Path, step: int, epoch: int) -> str:
    """Save the engine's state as ``step_NNNNNN`` and list it in ``checkpoints.jsonl``.

    Args:
        client: The training client (``save_state``); its queued steps finish first.
        run_dir: The run directory.
        step: Optimizer steps done (1-based), as logged.
        epoch: 0-based epoch of that step (listed 1-based).

    Returns:
        The checkpoint's path as the engine gives it (a local path or ``tinker://...``); the
        listed path is relative to ``run_dir`` when inside it.
    """
    path = client.save_state(f"step_{step:06d}").result().path
    recorded = path
    if "://" not in path and Path(path).resolve().is_relative_to(run_dir.resolve()):
        recorded = str(Path(path).resolve().relative_to(run_dir.resolve()))
    files.append_jsonl(run_dir / CHECKPOINTS_FILE, {"step": step, "epoch": epoch + 1,
                                                   "path": recorded, "kind": "state"})
    return path


def stopped_message(run_dir: Path, advice: str) -> str:
    """``training stopped, <where to resume>``: the last checkpoint of ``checkpoints.jsonl``.

    Args:
        run_dir: The run directory.
        advice: What to do before resuming, ending in ``", "`` or ``" "`` (``"lower
            LEARNING_RATE ..., then "``).
    """
    saved = files.read_jsonl(run_dir / CHECKPOINTS_FILE)
    if not saved:
        return (f"training stopped; the run {_NOTHING_TO_RESUME}{_saves(run_dir)}: start it "
                f"again: remove {run_dir}, or choose another --run-dir")
    last = checkpoint_path(run_dir, saved[-1])
    return (f"training stopped, the last good checkpoint, {last} (step {saved[-1]['step']}), is "
            f"the latest in {run_dir / CHECKPOINTS_FILE}: {advice}continue with --resume {run_dir}")


@contextlib.contextmanager
def interrupt_names_checkpoint(run_dir: Path) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`~tinkerkit.errors.TrainingInterrupted`, whose
    message names the last checkpoint and the ``--resume`` command (:func:`stopped_message`)."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(stopped_message(run_dir, "")) from e


def export_final(checkpoint: str, run_dir: Path, config: TrainConfig,
                 console: Console) -> ExportResult | None:
    """With ``EXPORT_AFTER_TRAINING``, export ``checkpoint`` into ``run_dir/export`` exactly as
    ``tinkerkit export CHECKPOINT --output run_dir/export [--merge] --dtype EXPORT_DTYPE`` would.

    Returns:
        The :class:`~tinkerkit.export.ExportResult`, or None when export is off.

    Raises:
        ExportError, CheckpointError, EngineError, ModelError: The export failed, as
            :func:`~tinkerkit.export.export_checkpoint` says.
    """
    if not config.export_after_training:
        return None
    console.print(f"Exporting {checkpoint} to {run_dir / EXPORT_DIR}")
    result = export_checkpoint(checkpoint, run_dir / EXPORT_DIR, merge=config.export_merged,
                               dtype=config.export_dtype, base_url=config.tinker_base_url)
    if result.merged_dir is not None and result.logit_check_skipped is not None:
        console.print(f"Merged model ({result.dtype}): logit check skipped: "
                      f"{result.logit_check_skipped}")
    elif result.merged_dir is not None:
        console.print(f"Merged model ({result.dtype}): max |logit diff| = "
                      f"{result.max_logit_diff:.3g} (tolerance {result.tolerance:.3g})")
    return result
