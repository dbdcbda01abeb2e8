"""Engines: what the training loop and evaluation talk to.

Both engines offer the ``tinker`` SDK's client surface with ``tinker.types`` in and out:

- ``local`` (default): :class:`tinkerkit.engines.local.LocalTrainingClient`, PyTorch + PEFT in this
  process, on CPU or GPU.
- ``tinker``: the official SDK's ``TrainingClient``, against the hosted service or ``tinkerkit serve``.
"""

from __future__ import annotations

from pathlib import Path

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
                dtype=config.dtype, checkpoint_root=checkpoint_root)


def create_training_client(config: TrainConfig, checkpoint_root: Path, state: str | None = None,
                           with_optimizer: bool = False):
    """Create the training client that ``config.backend`` names.

    Args:
        config: The run's settings (base model, LoRA rank and targets, seed, device).
        checkpoint_root: Where the client writes checkpoints.
        state: A checkpoint to start from (``--resume`` or ``--init-from``), or None.
        with_optimizer: Restore the AdamW state too (exact resume) rather than weights only.

    Raises:
        ConfigError: An unknown backend.
        CheckpointError: ``state`` is missing, corrupted or incompatible.
    """
    check_device(config.device)
    if config.backend == "local":
        from tinkerkit.engines.local import LocalTrainingClient, create_training_client_from_state

        kwargs = _local_kwargs(config, checkpoint_root)
        if state is not None:
            return create_training_client_from_state(state, with_optimizer=with_optimizer,
                                                     rank=config.lora_rank,
                                                     base_model=config.base_model, **kwargs)
        return LocalTrainingClient(config.base_model, config.lora_rank, **kwargs)
    raise ConfigError(f"BACKEND={config.backend!r} is not available yet; use 'local'")
