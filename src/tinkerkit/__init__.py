"""tinkerkit: LoRA fine-tuning for the Tinker workflow — split, train, evaluate, export, resume.

The same training loop runs on the embedded local PyTorch/PEFT engine and on the Tinker service
(through the official ``tinker`` SDK), with ``tinker.types`` as the contract between them.
"""

__version__ = "0.1.0"
