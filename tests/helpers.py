"""Test helpers: tiny random models built from a config (fast, deterministic, no download), and
a ``tinkerkit serve`` in a thread with the real ``tinker`` SDK pointed at it."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import tinker
import torch
import transformers

from tinkerkit.models import load_tokenizer

KEY = "tml-serve-test"

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


def seeded_lora_client(model: str, tmp_path: Path, seed: int = 123, **kwargs):
    """A CPU ``LocalTrainingClient`` (rank 4) whose LoRA B matrices are non-zero (seeded), so LoRA
    changes the outputs and LoRA A gets gradients."""
    from tinkerkit.engines.local import LocalTrainingClient
    from tinkerkit.engines.local.model import adapter_parameters

    kwargs = {"rank": 4, "device": "cpu", "checkpoint_root": tmp_path / "ckpt", **kwargs}
    client = LocalTrainingClient(model, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in adapter_parameters(client.model).items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return client


SHARED_DATA = Path(os.environ.get("TINKERKIT_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The project's real data (GSM8K, MATH-500, ...): ``../shared/data`` beside the checkout."""


@contextlib.contextmanager
def running_server(root, **kwargs):
    """A ``tinkerkit serve`` on a free loopback port, in a thread (``make_server`` arguments);
    yields its base ``url``, ``root`` and ``state``."""
    from tinkerkit.serve import make_server

    server = make_server("127.0.0.1", 0, root=root, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", root=Path(root),
                              state=server.state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def service(url, key=KEY):
    """A ``tinker.ServiceClient`` on ``url`` with API key ``key``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the SDK's own deprecation notices
        with tinker.ServiceClient(base_url=url, api_key=key) as client:
            yield client


def checkpoint_dir(root, tinker_path):
    """The directory of a checkpoint on a server with this root (the documented layout)."""
    model_id, segment, name = tinker_path.removeprefix("tinker://").split("/")
    return Path(root) / "runs" / model_id / segment / name
