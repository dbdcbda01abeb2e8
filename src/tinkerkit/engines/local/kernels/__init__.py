"""The local engine's compute kernels, each a drop-in for what transformers or PEFT computes.

- :mod:`~tinkerkit.engines.local.kernels.logprobs`: target-token log-probabilities, projected to
  the vocabulary chunk by chunk (one chunk rule), with a hand-written gradient for a frozen head.
- :mod:`~tinkerkit.engines.local.kernels.lora_linear`: PEFT's LoRA linear layer with a fused
  forward and backward pass.
- :mod:`~tinkerkit.engines.local.kernels.fused_layers`: RMSNorm and rotary embeddings with
  hand-written backward passes.
- :mod:`~tinkerkit.engines.local.kernels.packing`: attention over datums packed into one row.
- :mod:`~tinkerkit.engines.local.kernels.expert_lora`: LoRA on the experts of mixture-of-experts
  layers, in Tinker's adapter layout, with grouped per-expert products.
"""
