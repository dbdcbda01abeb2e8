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

Directories are written with :func:`tinkerkit.io.atomic_directory`, so a checkpoint either exists
whole or not at all. Only safetensors and JSON are read back: nothing is ever unpickled.

The training loop's own position (epoch, batch, step) lives in ``<run_dir>/checkpoints.jsonl``,
one line per checkpoint, so that the same resume logic serves the local and the Tinker engines.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinkerkit.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FILE = "tinkerkit_state.json"
CHECKPOINT_FORMAT = 1


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
