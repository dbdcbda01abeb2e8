"""The local engine: Tinker's client surface in this process, on PyTorch + PEFT, CPU or GPU.

- :mod:`~tinkerkit.engines.local.model`: dtype and device names, LoRA target presets, loading
  and wrapping a model, reading / applying / merging an adapter, base-model checks.
- :mod:`~tinkerkit.engines.local.batching`: datum validation, packing and padding plans.
- :mod:`~tinkerkit.engines.local.training`: :class:`LocalTrainingClient`.
- :mod:`~tinkerkit.engines.local.sampling`: :class:`LocalSamplingClient`.
- :mod:`~tinkerkit.engines.local.kernels`: frozen-head log-probabilities, the fused LoRA layer,
  fused RMSNorm and rotary layers, packed attention,
  expert LoRA for mixture-of-experts layers.
"""

from tinkerkit.engines.local.sampling import LocalSamplingClient
from tinkerkit.engines.local.training import LocalTrainingClient, create_training_client_from_state

__all__ = ["LocalSamplingClient", "LocalTrainingClient", "create_training_client_from_state"]
