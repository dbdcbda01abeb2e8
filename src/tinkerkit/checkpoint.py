"""The on-disk checkpoint layout shared by the local engine, the training loop and export.

A checkpoint is a directory that is also a valid PEFT adapter directory::

    <checkpoint>/
      adapter_config.json        PEFT LoraConfig (base_model_name_or_path, r, lora_alpha, ...)
      adapter_model.safetensors  LoRA weights in PEFT's key layout
                                 (base_model.model.<module>.lora_A.weight, ...), float32
      optimizer.safetensors      AdamW moments, keys "<param key>.exp_avg" / ".exp_avg_sq"
                                 (absent in sampler checkpoints)
      tinkerkit_state.json       {"format": 1, "kind": "state"|"sampler", "base_model": ...,
                                  "rank": ..., "alpha": ..., "optimizer_step": ...,
                                  "rng_state": <see engine>, "created": ISO time}

Directories are written with :func:`tinkerkit.files.atomic_directory`, so a checkpoint either exists
whole or not at all. Only safetensors and JSON are read back: nothing is ever unpickled.

The training loop's own position (epoch, batch, step) lives in ``<run_dir>/checkpoints.jsonl``,
one line per checkpoint, so that the same resume logic serves the local and the Tinker engines.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from tinkerkit import files
from tinkerkit.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FILE = "tinkerkit_state.json"
CHECKPOINT_FORMAT = 1
CHECKPOINTS_FILE = "checkpoints.jsonl"
TINKER_SCHEME = "tinker://"


def read_checkpoint_meta(path: str | Path) -> dict:
    """Read and validate a checkpoint's ``tinkerkit_state.json``.

    Args:
        path: The checkpoint directory.

    Returns:
        The metadata dict (see module docstring).

    Raises:
        CheckpointError: The directory, a weights file or the metadata is missing or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing (incomplete checkpoint?)")
    try:
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has an unknown format")
    return meta


def write_checkpoint_meta(directory: str | Path, kind: str, base_model: str, **fields) -> dict:
    """Write a checkpoint's ``tinkerkit_state.json`` (atomically) and return what was written.

    Args:
        directory: The checkpoint directory (usually a staging directory of
            :func:`tinkerkit.files.atomic_directory`).
        kind: ``"state"`` (weights and optimizer state) or ``"sampler"`` (weights only).
        base_model: The base model argument the adapter was trained on.
        **fields: The engine's fields (``rank``, ``alpha``, ``dropout``, ``target_modules``,
            ``train_unembed``, ``optimizer_step``, ``rng_state``); JSON values.

    Raises:
        ValueError: ``kind`` is neither (a programming error).
    """
    if kind not in ("state", "sampler"):
        raise ValueError(f"checkpoint kind '{kind}' is not 'state' or 'sampler'")
    meta = {"format": CHECKPOINT_FORMAT, "kind": kind, "base_model": base_model, **fields,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    files.atomic_write_json(Path(directory) / STATE_FILE, meta)
    return meta


def read_safetensors(file: Path, require_finite: bool = True) -> dict:
    """Load a safetensors file to CPU tensors (never unpickles).

    Args:
        file: The ``.safetensors`` file.
        require_finite: Refuse floating-point tensors holding NaN or inf.

    Returns:
        ``{key: torch.Tensor}``.

    Raises:
        CheckpointError: The file is missing, truncated or not safetensors, or (with
            ``require_finite``) holds a non-finite value.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} is missing")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} is corrupted: "
                              f"{str(e).splitlines()[0]}") from e
    for key, tensor in tensors.items() if require_finite else ():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {file.parent}: {file.name}: '{key}' holds "
                                  "non-finite values")
    return tensors


def read_lora_config(path: str | Path):
    """The PEFT ``LoraConfig`` of a checkpoint or adapter directory.

    ``r`` and ``lora_alpha`` must be in the file: PEFT would take its defaults (8 and 8) for a
    missing one, and an adapter of another scale would be applied silently wrong.

    Raises:
        CheckpointError: ``adapter_config.json`` is missing, not a LoRA config, or lacks ``r``
            or ``lora_alpha``.
    """
    from peft import LoraConfig

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"checkpoint {path}: {ADAPTER_CONFIG} is missing")
    try:
        recorded = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is unreadable: {e}") from e
    for field in ("r", "lora_alpha"):
        value = recorded.get(field) if isinstance(recorded, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: field '{field}' is "
                                  f"{'missing' if value is None else repr(value)}; a LoRA "
                                  "adapter needs its rank (r) and lora_alpha")
    try:
        return LoraConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {ADAPTER_CONFIG} is not a LoRA config: {e}") from e


def is_tinker_path(path: str | Path | None) -> bool:
    """Whether ``path`` names a checkpoint on a Tinker server (``tinker://...``), not on disk.

    The scheme is matched in any case (``TINKER://``): URI schemes are case-insensitive
    (RFC 3986 section 3.1). This is the one test of tinkerkit for a Tinker path.
    """
    return isinstance(path, str) and path[:len(TINKER_SCHEME)].lower() == TINKER_SCHEME


def parse_tinker_path(path: str):
    """The parts of a ``tinker://<run>/<kind>/<name>`` checkpoint path, checked before any
    server is asked about it.

    Returns:
        ``tinker.types.ParsedCheckpointTinkerPath``: ``tinker_path`` (the path with its scheme
        in lowercase, the form the SDK and servers take), ``training_run_id``,
        ``checkpoint_type`` (``training``, ``sampler`` or ``external``) and ``checkpoint_id``
        (``<kind>/<name>``).

    Raises:
        CheckpointError: Not ``tinker://`` (any case), then a run, a kind of ``weights``,
            ``sampler_weights`` or ``external_weights`` and a name, none empty.
    """
    from tinker import types

    canonical = TINKER_SCHEME + path[len(TINKER_SCHEME):] if is_tinker_path(path) else path
    try:
        if "" in canonical[len(TINKER_SCHEME):].split("/"):
            raise ValueError(path)
        return types.ParsedCheckpointTinkerPath.from_tinker_path(canonical)
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {path}: not a tinker://<run>/"
                              "{weights|sampler_weights|external_weights}/<name> path") from None


def checkpoint_path(run_dir: str | Path, entry: dict) -> str:
    """The checkpoint directory of a ``checkpoints.jsonl`` entry.

    Entries record paths relative to the run directory, so that a run directory can be copied or
    moved and still resumed; absolute paths (and ``tinker://`` paths) are returned as they are.
    """
    path = entry["path"]
    if is_tinker_path(path) or Path(path).is_absolute():
        return path
    return str(Path(run_dir) / path)


def latest_checkpoint(run_dir: str | Path) -> dict:
    """The newest complete checkpoint listed in ``run_dir/checkpoints.jsonl``.

    Returns:
        The entry, with ``path`` resolved against ``run_dir``, and ``skipped``: why each newer
        listed checkpoint was passed over (incomplete or damaged), newest first.

    Raises:
        CheckpointError: None is listed, or none of those listed is complete on disk.
    """
    skipped: list[str] = []
    for entry in reversed(files.read_jsonl(Path(run_dir) / CHECKPOINTS_FILE)):
        resolved = {**entry, "path": checkpoint_path(run_dir, entry), "skipped": skipped}
        if is_tinker_path(resolved["path"]):  # on the server; the server checks it when loading
            return resolved
        try:
            read_checkpoint_meta(resolved["path"])
            return resolved
        except CheckpointError as e:
            skipped.append(str(e))
    raise CheckpointError(f"{run_dir}: no complete checkpoint listed in {CHECKPOINTS_FILE}")


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint argument as a checkpoint directory: a run directory means its latest one.

    A ``tinker://`` path (any case) is checked for its shape and returned with its scheme in
    lowercase (:func:`parse_tinker_path`); the Tinker server resolves it.

    Raises:
        CheckpointError: ``path`` does not exist or is not a directory, or is a malformed
            ``tinker://`` path.
    """
    if is_tinker_path(path):
        return parse_tinker_path(path).tinker_path
    path = Path(path)
    if (path / CHECKPOINTS_FILE).is_file():
        return latest_checkpoint(path)["path"]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    return str(path)
