"""Engines: what the training loop, evaluation, export and the demo talk to.

Both engines offer the ``tinker`` SDK's client surface, with ``tinker.types`` in and out; the
Protocols below name the part of it tinkerkit uses, and the factory functions are the one place
where an engine is chosen (:func:`backend_of`):

- ``local`` (default): :mod:`tinkerkit.engines.local`, PyTorch + PEFT in this process, on CPU or
  GPU.
- ``tinker``: :mod:`tinkerkit.engines.tinker`, the official SDK against the hosted service or
  ``tinkerkit serve`` (``TINKER_BASE_URL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tinker import types

from tinkerkit.checkpoint import is_tinker_path
from tinkerkit.config import TrainConfig
from tinkerkit.engines import tinker as tinker_engine
from tinkerkit.engines.local import (
    LocalSamplingClient,
    LocalTrainingClient,
    create_training_client_from_state,
)
from tinkerkit.engines.local.model import base_model_of, parse_targets, resolve_device
from tinkerkit.errors import ConfigError
from tinkerkit.models import load_tokenizer

EVAL_BATCH_SIZE = 64
"""Sequences a local sampler generates together. Decoding a small model on the CPU is bound by
reading the weights once per step, so a wide batch costs little more per step than a narrow one
(SmolLM2-135M: about 0.15 s per decode step at 8 sequences and 0.2 s at 40)."""


class ResultFuture(Protocol):
    """A pending result: ``concurrent.futures.Future`` locally, the SDK's future on Tinker."""

    def result(self, timeout: float | None = None) -> Any: ...


class SamplingClient(Protocol):
    """The part of ``tinker.SamplingClient`` that tinkerkit uses."""

    def sample(self, prompt: types.ModelInput, num_samples: int,
               sampling_params: types.SamplingParams, **kwargs: Any) -> ResultFuture:
        """Future of a ``SampleResponse``: ``num_samples`` sequences with their logprobs."""
        ...

    def compute_logprobs(self, prompt: types.ModelInput) -> ResultFuture:
        """Future of the prompt's per-token log-probabilities (None first)."""
        ...

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer."""
        ...

    def close(self) -> None:
        """Release the client's worker or session."""
        ...


class TrainingClient(Protocol):
    """The part of ``tinker.TrainingClient`` that tinkerkit's training loop uses."""

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ResultFuture:
        """Future of a ``ForwardBackwardOutput``; gradients add up until ``optim_step``."""
        ...

    def forward(self, data: Sequence[types.Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ResultFuture:
        """Future of a ``ForwardBackwardOutput`` computed without gradients."""
        ...

    def optim_step(self, optim_params: types.AdamParams) -> ResultFuture:
        """Future of an ``OptimStepResponse`` after one AdamW step."""
        ...

    def save_state(self, name: str) -> ResultFuture:
        """Future of a ``SaveWeightsResponse`` (weights and optimizer state)."""
        ...

    def save_weights_for_sampler(self, name: str) -> ResultFuture:
        """Future of a ``SaveWeightsForSamplerResponse`` (weights only)."""
        ...

    def save_weights_and_get_sampling_client(self) -> SamplingClient:
        """A sampling client on the current weights."""
        ...

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A sampling client on the weights saved at ``model_path``."""
        ...

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer."""
        ...

    def get_info(self) -> types.GetInfoResponse:
        """The base model and LoRA rank."""
        ...


def backend_of(config: TrainConfig, checkpoint: str | None = None) -> str:
    """The engine a command runs on: ``"tinker"`` for a ``tinker://`` checkpoint (its weights
    are on that server), else ``config.backend``.

    Raises:
        ConfigError: An unknown ``BACKEND``.
    """
    if is_tinker_path(checkpoint):
        return "tinker"
    if config.backend not in ("local", "tinker"):
        raise ConfigError(f"BACKEND={config.backend!r}: use 'local' or 'tinker'")
    return config.backend


def check_engine(config: TrainConfig, checkpoint: str | None = None) -> str:
    """Check the engine settings before any work starts: the backend (:func:`backend_of`) and,
    for the local engine, the device.

    Returns:
        The backend, ``"local"`` or ``"tinker"``.

    Raises:
        ConfigError: An unknown backend, or a device this machine does not have.
    """
    backend = backend_of(config, checkpoint)
    if backend == "local":
        resolve_device(config.device)
    return backend


def _local_kwargs(config: TrainConfig, checkpoint_root: Path) -> dict:
    return dict(alpha=config.lora_alpha, dropout=config.lora_dropout,
                target_modules=parse_targets(config.lora_targets),
                train_unembed=config.train_unembed, seed=config.seed, device=config.device,
                dtype=config.dtype, checkpoint_root=checkpoint_root,
                activation_checkpointing=config.activation_checkpointing,
                mixed_precision=config.mixed_precision, cpu_threads=config.cpu_threads)


def create_training_client(config: TrainConfig, checkpoint_root: Path, state: str | None = None,
                           with_optimizer: bool = False) -> TrainingClient:
    """Create the training client of the engine :func:`backend_of` chooses.

    Args:
        config: The run's settings (base model, LoRA rank and targets, seed, device).
        checkpoint_root: Where the local client writes checkpoints (the Tinker server keeps
            its own; their ``tinker://`` paths come back from ``save_state``).
        state: A checkpoint to start from (``--resume`` or ``--init-from``), or None: a
            directory for the local engine, a ``tinker://`` path for the Tinker engine.
        with_optimizer: Restore the AdamW state too (exact resume) rather than weights only.

    Raises:
        ConfigError: An unknown backend or device, or a local checkpoint with BACKEND=tinker.
        CheckpointError: ``state`` is missing, corrupted or incompatible.
        EngineError: The Tinker server cannot be reached or refuses the request.
    """
    if check_engine(config, state) == "tinker":
        return tinker_engine.create_training_client(config, state, with_optimizer=with_optimizer)
    kwargs = _local_kwargs(config, checkpoint_root)
    if state is not None:
        return create_training_client_from_state(state, with_optimizer=with_optimizer,
                                                 rank=config.lora_rank,
                                                 base_model=config.base_model, **kwargs)
    return LocalTrainingClient(config.base_model, config.lora_rank, **kwargs)


def create_sampling_client(config: TrainConfig, checkpoint: str | None = None,
                           base_model: str | None = None) -> SamplingClient:
    """Create a sampling client on the engine :func:`backend_of` chooses.

    Args:
        config: ``BACKEND``, ``BASE_MODEL``, ``DEVICE``, ``DTYPE`` and ``TINKER_BASE_URL``.
        checkpoint: A checkpoint or adapter directory, a ``tinker://`` path, or None for the
            base model itself.
        base_model: Overrides the base model; by default the one the checkpoint records
            (:func:`~tinkerkit.engines.local.model.base_model_of`), else ``BASE_MODEL``.

    Returns:
        A client whose ``base_model`` attribute names the model it samples.

    Raises:
        ConfigError: An unknown backend or device, or a local checkpoint with BACKEND=tinker.
        CheckpointError, ModelError: The checkpoint or base model cannot be loaded.
        EngineError: The Tinker server cannot be reached or refuses the request.
    """
    if check_engine(config, checkpoint) == "tinker":
        if checkpoint is not None and not is_tinker_path(checkpoint):
            raise ConfigError(f"BACKEND=tinker samples tinker:// checkpoints or base models, not "
                              f"{checkpoint} (sample a local checkpoint with BACKEND=local)")
        return tinker_engine.create_sampling_client(
            checkpoint, config.tinker_base_url,
            base_model=None if checkpoint else base_model or config.base_model)
    recorded = None if checkpoint is None else base_model_of(checkpoint)
    return LocalSamplingClient(base_model or recorded or config.base_model,
                               adapter_path=checkpoint, device=config.device, dtype=config.dtype,
                               max_batch_size=EVAL_BATCH_SIZE, cpu_threads=config.cpu_threads)


def load_engine_tokenizer(config: TrainConfig):
    """The tokenizer of ``config.base_model`` as the configured engine names it.

    Local: :func:`tinkerkit.models.load_tokenizer`. Tinker: the same for the models tinkerkit
    knows offline, else the SDK's lookup (:func:`tinkerkit.engines.tinker.load_tinker_tokenizer`).

    Raises:
        ModelError: No tokenizer can be loaded for the name.
    """
    if backend_of(config) == "tinker":
        return tinker_engine.load_tinker_tokenizer(config.base_model)
    return load_tokenizer(config.base_model)
