"""The on-disk state of ``tinkerkit serve``: training runs and their checkpoints under ``--root``.

Layout::

    <root>/runs/<model_id>/
      run.json                     base model, LoRA settings, owner digest, creation time
      weights/<name>/              save_state: a tinkerkit checkpoint with optimizer state
      sampler_weights/<name>/      save_weights_for_sampler: weights only
      external_weights/<name>/     save_weights_external: weights only; its PEFT files
                                   (adapter_config.json, adapter_model.safetensors) are what
                                   get_external_weights_urls hands out
      <checkpoint>/tinker_checkpoint.json   optional: user_metadata, expires_at (ttl_seconds)

Every checkpoint directory is a tinkerkit checkpoint (:mod:`tinkerkit.checkpoint`) and a PEFT
adapter directory. Model ids are ``<session id>:train:<n>`` and checkpoint paths
``tinker://<model id>/{weights|sampler_weights|external_weights}/<name>``, as on the hosted
service. Every id and name in a request is checked against a strict pattern before it becomes a
path, and the resulting path is checked to lie under the root without passing through a symbolic
link (the server makes none; one placed in the root by hand is treated as absent, so it can
neither lead outside the root nor into another key's run), so no request reaches a file outside
it. Everything written goes through :mod:`tinkerkit.files` (atomic), so a restarted server
finds complete runs and checkpoints only.
"""

from __future__ import annotations

import datetime as _dt
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tinker import types

from tinkerkit.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_FILE
from tinkerkit.checkpoint import parse_tinker_path as parse_checkpoint_path
from tinkerkit.errors import CheckpointError, RequestError
from tinkerkit.files import atomic_write_json, read_json

RUN_FILE = "run.json"
CHECKPOINT_META = "tinker_checkpoint.json"
RUN_FORMAT = 1
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
"""Longest ``ttl_seconds`` of a checkpoint (100 years; the expiry must be a valid date)."""
SEGMENTS = {"weights": "training", "sampler_weights": "sampler",
            "external_weights": "external"}
"""Path segment -> ``Checkpoint.checkpoint_type`` (as ``types.ParsedCheckpointTinkerPath``)."""
EXTERNAL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
"""The files of an external-weights checkpoint that are downloadable (the PEFT layout)."""

SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MODEL_ID = re.compile(rf"(?P<session>{SESSION_ID.pattern}):train:(?P<seq>[0-9]{{1,9}})")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def now_utc() -> _dt.datetime:
    """The current time, timezone-aware UTC."""
    return _dt.datetime.now(_dt.UTC)


def check_ttl(ttl_seconds: int | None) -> int | None:
    """A checkpoint's ``ttl_seconds``: None (kept until deleted) or 1 to
    :data:`MAX_TTL_SECONDS`.

    Raises:
        RequestError: 400 otherwise.
    """
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise RequestError(400, f"ttl_seconds={ttl_seconds} must be in [1, {MAX_TTL_SECONDS}] "
                                "(100 years)")
    return ttl_seconds


def check_name(name: str | None, what: str = "checkpoint name") -> str:
    """A checkpoint name: letters, digits, ``.``, ``_``, ``-``; starts alphanumeric; <= 128.

    Raises:
        RequestError: 400 otherwise (a name never becomes a path before this check).
    """
    if not name or not NAME.fullmatch(name):
        raise RequestError(400, f"{what} {name!r} must be 1-128 letters, digits, '.', '_' or "
                                "'-', starting with a letter or digit")
    return name


@dataclass
class RunRecord:
    """A training run as ``run.json`` stores it.

    Attributes:
        model_id: ``<session id>:train:<n>``.
        base_model: The served name the client used.
        owner: The owner digest (:func:`tinkerkit.serve.auth.owner_id`).
        rank, seed, train_mlp, train_attn, train_unembed: The LoRA settings.
        created: ISO-8601 UTC creation time.
        user_metadata: The client's metadata for the run.
    """

    model_id: str
    base_model: str
    owner: str
    rank: int
    seed: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    created: str = field(default_factory=lambda: now_utc().isoformat(timespec="seconds"))
    user_metadata: dict[str, str] | None = None

    def to_json(self) -> dict:
        """The ``run.json`` content."""
        return {"format": RUN_FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        """Parse ``run.json`` content (KeyError/TypeError on a damaged file)."""
        fields = {k: v for k, v in data.items() if k != "format"}
        return cls(**fields)


class CheckpointStore:
    """Runs and checkpoints under ``root`` (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        self.runs = (self.root / "runs").resolve()

    # -- paths

    def _linked(self, path: Path) -> bool:
        """Whether ``path`` (built under ``<root>/runs`` from checked ids and names) leaves the
        root or passes through a symbolic link below it.

        The server never makes links; one placed in the root could point outside it or at
        another key's run, so it is treated as absent.
        """
        return path.resolve() != path or not path.is_relative_to(self.runs)

    def _inside(self, path: Path) -> Path:
        if self._linked(path):
            raise RequestError(400, "path escapes the server root or passes through a "
                                    "symbolic link")
        return path

    def file(self, directory: Path, name: str) -> Path:
        """The regular file ``name`` of a checkpoint directory, symbolic links refused.

        Raises:
            RequestError: 404 when it is missing, not a regular file, or a symbolic link.
        """
        path = directory / name
        if self._linked(path) or not path.is_file():
            raise RequestError(404, f"file '{name}' of checkpoint {directory.name} not found")
        return path

    def run_dir(self, model_id: str) -> Path:
        """The directory of a run (exists or not).

        Raises:
            RequestError: 404 when ``model_id`` is not of the form ``<session>:train:<n>``.
        """
        if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
            raise RequestError(404, f"unknown model id {model_id!r} (expected "
                                    "<session id>:train:<n>)")
        return self._inside(self.runs / model_id)

    def checkpoint_dir(self, model_id: str, segment: str, name: str) -> Path:
        """The directory of a checkpoint (exists or not); ``segment`` as in tinker paths."""
        if segment not in SEGMENTS:
            raise RequestError(400, f"checkpoint kind '{segment}' is not one of "
                                    f"{', '.join(SEGMENTS)}")
        return self._inside(self.run_dir(model_id) / segment / check_name(name))

    @staticmethod
    def tinker_path(model_id: str, segment: str, name: str) -> str:
        """``tinker://<model_id>/<segment>/<name>``."""
        return f"tinker://{model_id}/{segment}/{name}"

    @staticmethod
    def parse_tinker_path(path: str) -> tuple[str, str, str]:
        """``(model_id, segment, name)`` of a ``tinker://`` checkpoint path (scheme in any case;
        :func:`tinkerkit.checkpoint.parse_tinker_path`).

        Raises:
            RequestError: 400 when the path is not ``tinker://<model>/<segment>/<name>`` with
                a known segment and a valid name.
        """
        try:
            parsed = parse_checkpoint_path(path)
        except CheckpointError:
            raise RequestError(400, f"checkpoint path {path!r} is not tinker://<model id>/"
                                    "{weights|sampler_weights|external_weights}/<name>") from None
        segment, name = parsed.checkpoint_id.split("/")
        return parsed.training_run_id, segment, check_name(name)

    # -- runs

    def create_run(self, record: RunRecord) -> Path:
        """Write ``run.json`` of a new run; returns the run directory."""
        directory = self.run_dir(record.model_id)
        atomic_write_json(directory / RUN_FILE, record.to_json())
        return directory

    def discard_run(self, model_id: str) -> None:
        """Remove a run whose model never loaded: its ``run.json`` and the directories left
        empty. Anything else in it stays."""
        directory = self.run_dir(model_id)
        (directory / RUN_FILE).unlink(missing_ok=True)
        for path in [*sorted(directory.rglob("*"), reverse=True), directory]:
            if path.is_dir() and not path.is_symlink():
                try:
                    path.rmdir()  # only when empty
                except OSError:
                    pass

    def read_run(self, model_id: str, owner: str) -> RunRecord:
        """The run ``model_id`` if ``owner`` owns it.

        Raises:
            RequestError: 404 when it does not exist, is damaged or belongs to another key.
        """
        file = self.run_dir(model_id) / RUN_FILE
        try:
            record = RunRecord.from_json(read_json(file))
        except (OSError, ValueError, KeyError, TypeError):
            record = None
        if record is None or record.owner != owner:
            raise RequestError(404, f"training run '{model_id}' not found")
        return record

    def list_runs(self, owner: str) -> list[RunRecord]:
        """The owner's runs, newest first (damaged run files are skipped)."""
        records = []
        for directory in self.runs.iterdir():
            if not MODEL_ID.fullmatch(directory.name) or self._linked(directory):
                continue
            try:
                record = RunRecord.from_json(read_json(directory / RUN_FILE))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if record.owner == owner:
                records.append(record)
        return sorted(records, key=lambda r: r.created, reverse=True)

    # -- checkpoints

    def write_checkpoint_meta(self, directory: Path, user_metadata: dict[str, str] | None,
                              ttl_seconds: int | None) -> None:
        """Record user metadata and expiry of a saved checkpoint (nothing when both are None).

        Raises:
            RequestError: 400 for a ``ttl_seconds`` that :func:`check_ttl` refuses.
        """
        check_ttl(ttl_seconds)
        if user_metadata is None and ttl_seconds is None:
            return
        expires = None if ttl_seconds is None else (
            now_utc() + _dt.timedelta(seconds=ttl_seconds)).isoformat(timespec="seconds")
        atomic_write_json(directory / CHECKPOINT_META,
                          {"user_metadata": user_metadata, "expires_at": expires})

    def _describe(self, model_id: str, segment: str, directory: Path) -> types.Checkpoint | None:
        """The listing entry of a complete, unexpired checkpoint; None otherwise.

        An expired checkpoint is deleted here.
        """
        if (not NAME.fullmatch(directory.name) or self._linked(directory)
                or any(f.is_symlink() for f in directory.iterdir())
                or not (directory / STATE_FILE).is_file()):
            return None
        try:
            meta = read_json(directory / CHECKPOINT_META)
        except (OSError, ValueError):
            meta = {}
        expires = meta.get("expires_at") if isinstance(meta, dict) else None
        expires_at = _dt.datetime.fromisoformat(expires) if expires else None
        if expires_at is not None and expires_at <= now_utc():
            shutil.rmtree(directory, ignore_errors=True)
            return None
        try:
            created = _dt.datetime.fromisoformat(read_json(directory / STATE_FILE)["created"])
        except (OSError, ValueError, KeyError, TypeError):
            created = _dt.datetime.fromtimestamp(directory.stat().st_mtime, _dt.UTC)
        files = EXTERNAL_FILES if segment == "external_weights" else None
        size = sum(f.stat().st_size for f in directory.iterdir()
                   if f.is_file() and (files is None or f.name in files))
        return types.Checkpoint(
            checkpoint_id=f"{segment}/{directory.name}", checkpoint_type=SEGMENTS[segment],
            time=created, tinker_path=self.tinker_path(model_id, segment, directory.name),
            size_bytes=size, user_metadata=meta.get("user_metadata") if meta else None,
            expires_at=expires_at)

    def list_checkpoints(self, model_id: str) -> list[types.Checkpoint]:
        """Every complete checkpoint of a run, oldest first."""
        found = []
        for segment in SEGMENTS:
            directory = self.run_dir(model_id) / segment
            if directory.is_dir():
                found += [c for d in sorted(directory.iterdir()) if d.is_dir()
                          if (c := self._describe(model_id, segment, d)) is not None]
        return sorted(found, key=lambda c: c.time)

    def checkpoint(self, tinker_path: str, owner: str) -> tuple[RunRecord, Path]:
        """The run and directory of an existing checkpoint that ``owner`` may use.

        Raises:
            RequestError: 400 for a malformed path; 404 when the run or checkpoint does not
                exist (or expired) or belongs to another key.
        """
        model_id, segment, name = self.parse_tinker_path(tinker_path)
        record = self.read_run(model_id, owner)
        directory = self.checkpoint_dir(model_id, segment, name)
        if not directory.is_dir() or self._describe(model_id, segment, directory) is None:
            raise RequestError(404, f"checkpoint '{tinker_path}' not found")
        return record, directory

    def delete_checkpoint(self, model_id: str, checkpoint_id: str, owner: str) -> None:
        """Delete ``<segment>/<name>`` of a run.

        Raises:
            RequestError: As :meth:`checkpoint`.
        """
        segment, _, name = checkpoint_id.partition("/")
        _, directory = self.checkpoint(self.tinker_path(model_id, segment, name), owner)
        shutil.rmtree(directory)
