"""Engines: what the training loop and evaluation talk to.

Both engines offer the ``tinker`` SDK's client surface with ``tinker.types`` in and out:

- ``local`` (default): :class:`tinkerkit.engines.local.LocalTrainingClient`, PyTorch + PEFT in this
  process, on CPU or GPU.
- ``tinker``: :class:`tinkerkit.engines.tinker.TinkerTrainingClient`, the official SDK's
  ``TrainingClient`` against the hosted service or ``tinkerkit serve`` (``TINKER_BASE_URL``).
"""

from __future__ import annotations

from pathlib import Path

from tinkerkit.checkpoint import is_tinker_path
from tinkerkit.config import TrainConfig
from tinkerkit.errors import ConfigError


def check_device(device: str) -> None:
    """Refuse a device this torch build cannot use, in one line.

    Raises:
        ConfigError: ``cuda``/``cuda:N`` without a usable CUDA device, or an unknown device.
    """
    import torch

    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"DEVICE={device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={device!r}: this torch build has no usable CUDA device "
                          "(install a CUDA build of torch, or use DEVICE=cpu)")


def _local_kwargs(config: TrainConfig, checkpoint_root: Path) -> dict:
    targets = config.lora_targets
    if "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return dict(alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets,
                train_unembed=config.train_unembed, seed=config.seed, device=config.device,
                dtype=config.dtype, checkpoint_root=checkpoint_root,
                activation_checkpointing=config.activation_checkpointing,
                mixed_precision=config.mixed_precision)


def create_training_client(config: TrainConfig, checkpoint_root: Path, state: str | None = None,
                           with_optimizer: bool = False):
    """Create the training client that ``config.backend`` names.

    Args:
        config: The run's settings (base model, LoRA rank and targets, seed, device).
        checkpoint_root: Where the local client writes checkpoints (the Tinker server keeps
            its own; their ``tinker://`` paths come back from ``save_state``).
        state: A checkpoint to start from (``--resume`` or ``--init-from``), or None: a
            directory for the local engine, a ``tinker://`` path for the Tinker engine.
        with_optimizer: Restore the AdamW state too (exact resume) rather than weights only.

    Raises:
        ConfigError: An unknown backend, or a checkpoint of the other engine.
        CheckpointError: ``state`` is missing, corrupted or incompatible.
        EngineError: The Tinker server cannot be reached or refuses the request.
    """
    if config.backend == "tinker":
        from tinkerkit.engines.tinker import create_training_client as create_tinker_client

        return create_tinker_client(config, state, with_optimizer=with_optimizer)
    check_device(config.device)
    if is_tinker_path(state):
        raise ConfigError(f"{state} is on a Tinker server: train on from it with BACKEND=tinker")
    if config.backend == "local":
        from tinkerkit.engines.local import LocalTrainingClient, create_training_client_from_state

        kwargs = _local_kwargs(config, checkpoint_root)
        if state is not None:
            return create_training_client_from_state(state, with_optimizer=with_optimizer,
                                                     rank=config.lora_rank,
                                                     base_model=config.base_model, **kwargs)
        return LocalTrainingClient(config.base_model, config.lora_rank, **kwargs)
    raise ConfigError(f"BACKEND={config.backend!r}: use 'local' or 'tinker'")


def load_engine_tokenizer(config: TrainConfig):
    """The tokenizer of ``config.base_model`` as the configured engine names it.

    Local: :func:`tinkerkit.models.load_tokenizer`. Tinker: the same for the models tinkerkit
    knows offline, else the SDK's lookup (:func:`tinkerkit.engines.tinker.load_tinker_tokenizer`).

    Raises:
        ModelError: No tokenizer can be loaded for the name.
    """
    if config.backend == "tinker":
        from tinkerkit.engines.tinker import load_tinker_tokenizer

        return load_tinker_tokenizer(config.base_model)
    from tinkerkit.models import load_tokenizer

    return load_tokenizer(config.base_model)
