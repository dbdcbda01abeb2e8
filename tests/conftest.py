"""Shared fixtures: the real SmolLM2 and Qwen3 tokenizers (fast to load) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

# Tests compare runs bitwise (a resumed run with an uninterrupted one, training before and after
# an evaluation, serve against in-process), which on the CPU holds at a fixed thread count. The
# local engine's own choice of threads (CPU_THREADS = "auto") follows the machine's load and
# could change the count between two runs of one test on a busy machine; a thread count set in
# the environment turns it off, as documented (test_threads.py tests the choice itself).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="session")
def smol_tokenizer():
    from tinkerkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama (tied embeddings, SmolLM2 vocabulary and tokenizer) as an HF dir."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The offline Qwen2.5/Qwen3 tokenizer with tinkerkit's Qwen3 chat template (151,669 ids)."""
    from tinkerkit.models import load_tokenizer

    return load_tokenizer("qwen3-tokenizer")


TINY_QWEN3 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, initializer_range=0.2)
"""The widths the tiny Qwen3 and Qwen3-MoE fixtures share."""


def _saved_random_model(tmp_path_factory, name: str, config, tokenizer) -> str:
    from tinkerkit.models import save_random_model

    path = tmp_path_factory.mktemp(name)
    save_random_model(config, path, tokenizer, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, qwen_tokenizer) -> str:
    """A 2-layer random Qwen3 (width 64, untied, the real 151,936-row vocabulary) as an HF dir."""
    from tinkerkit.models import qwen3_tiny_config

    config = qwen3_tiny_config(intermediate_size=128, **TINY_QWEN3)
    return _saved_random_model(tmp_path_factory, "tiny-qwen3", config, qwen_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory, qwen_tokenizer) -> str:
    """A 2-layer random Qwen3-MoE (width 64, 8 experts of width 32, 2 routed, untied, the real
    151,936-row vocabulary) as an HF dir (per-expert tensors on disk, fused in memory)."""
    from tinkerkit.models import qwen3_moe_tiny_config

    config = qwen3_moe_tiny_config(moe_intermediate_size=32, **TINY_QWEN3)
    return _saved_random_model(tmp_path_factory, "tiny-qwen3-moe", config, qwen_tokenizer)


@pytest.fixture
def fake_engine(monkeypatch, smol_tokenizer):
    """Every training client the loop creates is a scripted ``test_train_loop.FakeClient``;
    returns the list of those created."""
    from test_train_loop import FakeClient

    clients = []

    def create(config, checkpoint_root, state=None, with_optimizer=False):
        clients.append(FakeClient(smol_tokenizer, checkpoint_root))
        return clients[-1]

    monkeypatch.setattr("tinkerkit.engines.create_training_client", create)
    return clients
