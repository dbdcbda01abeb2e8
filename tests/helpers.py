"""Test helpers: tiny random models built from a config (fast, deterministic, no download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from tinkerkit.models import load_tokenizer

VOCAB = 49152  # the real SmolLM2 tokenizer's vocabulary


def save_tiny_llama(path: str | Path, *, tied: bool = True, width: int = 64,
                    initializer_range: float = 0.2, seed: int = 0) -> str:
    """Save a 2-layer random Llama with the SmolLM2 tokenizer as an HF directory; returns its path.

    ``initializer_range=0.2`` makes the random model's next-token distributions peaked enough that
    greedy decoding varies from token to token (at 0.02 it repeats one token).
    """
    path = Path(path)
    config = transformers.LlamaConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
        tie_word_embeddings=tied, initializer_range=initializer_range, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return str(path)


SHARED_DATA = Path(os.environ.get("TINKERKIT_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The project's real data (GSM8K, MATH-500, ...): ``../shared/data`` beside the checkout."""
