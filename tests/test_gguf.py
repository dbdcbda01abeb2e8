"""GGUF export: the file read back by readers tinkerkit did not write.

``gguf.GGUFReader`` reads the metadata and tensors; transformers' GGUF loader rebuilds the
tokenizer and the model (its logits are compared with the source model's); llama.cpp itself runs
the file in the slow test. Models are tiny random ones (2 layers, width 64) with the real SmolLM2
and Qwen3 tokenizers.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType, dequantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import save_tiny_llama
from tinkerkit.errors import ConfigError, ExportError
from tinkerkit.export_gguf import (
    export_gguf,
    gguf_config,
    gguf_tolerance,
    load_tokenizer_gguf,
    write_gguf,
)

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tom has 17 apples and eats 4. How many are left?"},
        {"role": "assistant", "content": "17 - 4 = 13 apples.\n#### 13"}]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "model", tied=True, width=64)


@pytest.fixture(scope="module")
def llama_f16(llama_dir, tmp_path_factory):
    return export_gguf(llama_dir, tmp_path_factory.mktemp("out") / "model-f16.gguf", "f16")


@pytest.fixture(scope="module")
def llama_q8(llama_dir, tmp_path_factory):
    return export_gguf(llama_dir, tmp_path_factory.mktemp("out") / "model-q8_0.gguf", "q8_0")


@pytest.fixture(scope="module")
def qwen3_f16(tiny_qwen3, tmp_path_factory):
    return export_gguf(tiny_qwen3, tmp_path_factory.mktemp("out") / "model-f16.gguf", "f16")


def _fields(path) -> dict:
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")
            or name in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
            or name.endswith("_id") or name.endswith("_token")}


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _alone(path, tmp_path):
    """A copy of the file alone in a directory (transformers also reads files beside it)."""
    target = tmp_path / "alone" / "model.gguf"
    target.parent.mkdir()
    shutil.copy(path, target)
    return target


def _chat_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _naive_llama_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order, one row at a time: each head's halves interleaved."""
    dim = weight.shape[0] // heads
    rows = []
    for h in range(heads):
        for i in range(dim // 2):
            rows += [weight[h * dim + i], weight[h * dim + dim // 2 + i]]
    return torch.stack(rows)


def test_llama_metadata_and_tensors_read_back(llama_dir, llama_f16, smol_tokenizer):
    fields = _fields(llama_f16.path)
    assert fields["general.architecture"] == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 64,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.context_length": 512,
                "llama.attention.key_length": 16, "llama.rope.dimension_count": 16,
                "llama.vocab_size": 49152, "general.file_type": 1,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.bos_token_id": smol_tokenizer.bos_token_id,
                "tokenizer.ggml.eos_token_id": smol_tokenizer.eos_token_id,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.chat_template"] == smol_tokenizer.chat_template

    tensors = _tensors(llama_f16.path)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}  # tied: no output.weight
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_down.weight"].tensor_type == GGMLQuantizationType.F16
    # GGUF lists dimensions fastest first: k_proj [32 rows, 64 columns] is [64, 32]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["token_embd.weight"].shape) == [64, 49152]

    reader = GGUFReader(llama_f16.path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49152 and tokens[1] == "<|im_start|>"
    assert tokens == [smol_tokenizer.convert_ids_to_tokens(i) for i in range(49152)]


def test_llama_query_and_key_rows_in_llama_cpp_order(llama_dir, llama_f16):
    weights = load_file(f"{llama_dir}/model.safetensors")
    tensors = _tensors(llama_f16.path)
    for name, key, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        original = weights[f"model.layers.1.self_attn.{key}.weight"]
        stored = torch.from_numpy(np.array(tensors[f"blk.1.{name}.weight"].data))
        assert torch.equal(stored, _naive_llama_permute(original, heads).half())
    # the value projection is stored as it is
    stored = torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data))
    assert torch.equal(stored, weights["model.layers.1.self_attn.v_proj.weight"].half())


def test_llama_f16_logits_match_through_transformers_gguf_loader(llama_dir, llama_f16, tmp_path,
                                                                 smol_tokenizer):
    assert llama_f16.max_logit_diff <= llama_f16.tolerance
    # again here, on another text, independently of export_gguf's own check
    input_ids = torch.tensor([_chat_ids(smol_tokenizer)])
    alone = _alone(llama_f16.path, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(alone.parent, gguf_file=alone.name,
                                                 dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = source(input_ids).logits
        diff = (model(input_ids).logits - reference).abs().max().item()
    assert diff <= gguf_tolerance("f16", reference)
    assert diff > 0  # float16 rounding is there: the file is not the float32 model itself
    assert model.config.tie_word_embeddings


def test_llama_tokenizer_round_trip(llama_f16, tmp_path, smol_tokenizer):
    rebuilt = load_tokenizer_gguf(_alone(llama_f16.path, tmp_path))
    assert _chat_ids(rebuilt) == _chat_ids(smol_tokenizer)
    assert rebuilt.chat_template == smol_tokenizer.chat_template


def test_q8_0_blocks_and_logits(llama_dir, llama_q8):
    assert llama_q8.max_logit_diff <= llama_q8.tolerance
    tensors = _tensors(llama_q8.path)
    ffn = tensors["blk.0.ffn_up.weight"]
    assert ffn.tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    stored = dequantize(ffn.data, ffn.tensor_type)  # [128, 64]
    original = load_file(f"{llama_dir}/model.safetensors")[
        "model.layers.0.mlp.up_proj.weight"].numpy()
    blocks = original.reshape(-1, 32)
    # Q8_0: each block of 32 as int8 multiples q of its step d = amax / 127, d stored in float16:
    # |q * fp16(d) - x| <= d / 2 + 127 * |fp16(d) - d| <= d * (1/2 + 127 * 2^-11)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = step * (0.5 + 127 * 2.0**-11) + 1e-8
    assert (np.abs(stored.reshape(-1, 32) - blocks) <= bound).all()
    assert np.abs(stored - original).max() > 0


def test_qwen3_metadata_tokens_and_logits(tiny_qwen3, qwen3_f16, tmp_path, qwen_tokenizer):
    assert qwen3_f16.max_logit_diff <= qwen3_f16.tolerance
    fields = _fields(qwen3_f16.path)
    expected = {"general.architecture": "qwen3", "qwen3.attention.key_length": 16,
                "qwen3.attention.value_length": 16, "qwen3.attention.head_count": 4,
                "qwen3.attention.head_count_kv": 2, "qwen3.embedding_length": 64,
                "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.eos_token_id": 151645,
                "tokenizer.ggml.padding_token_id": 151643,
                "tokenizer.ggml.bos_token_id": 151643}
    assert {k: fields[k] for k in expected} == expected
    assert fields["qwen3.rope.freq_base"] == pytest.approx(1_000_000.0)
    tensors = _tensors(qwen3_f16.path)
    assert {"output.weight", "blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= set(
        tensors)
    # NeoX rotary layout: Qwen3's query rows are stored unpermuted
    stored = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    original = load_file(f"{tiny_qwen3}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(stored, original.half())

    reader = GGUFReader(qwen3_f16.path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 151936  # the embedding's rows; ids past the tokenizer's are padding
    assert (tokens[151644], types[151644]) == ("<|im_start|>", TokenType.CONTROL)
    assert (tokens[151667], types[151667]) == ("<think>", TokenType.USER_DEFINED)
    assert (tokens[151700], types[151700]) == ("[PAD151700]", TokenType.UNUSED)
    assert types[100] == TokenType.NORMAL

    alone = _alone(qwen3_f16.path, tmp_path)
    assert gguf_config(alone).head_dim == 16  # from the file, not Qwen3's default 128
    rebuilt = load_tokenizer_gguf(alone)
    thinking = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"}]
    text = qwen_tokenizer.apply_chat_template(thinking, tokenize=False)
    assert rebuilt(text, add_special_tokens=False)["input_ids"] == qwen_tokenizer(
        text, add_special_tokens=False)["input_ids"]
    assert _chat_ids(rebuilt) == _chat_ids(qwen_tokenizer)


def test_qwen3_moe_experts_stacked_as_llama_cpp_stores_them(tmp_path, smol_tokenizer):
    from tinkerkit.models import qwen3_moe_tiny_config, save_random_model

    model_dir = tmp_path / "moe"
    # the SmolLM2 tokenizer keeps this fast; the architecture is Qwen3-MoE's
    config = qwen3_moe_tiny_config(vocab_size=49152, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                   num_experts_per_tok=2, initializer_range=0.2, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=2)
    save_random_model(config, model_dir, smol_tokenizer, seed=0)
    result = export_gguf(model_dir, tmp_path / "out" / "model-f16.gguf", "f16")
    assert result.max_logit_diff <= result.tolerance
    # q8_0: the check replays the merged model's expert choices (a near tie flipped by Q8_0's
    # rounding moved the logits by 2.5 here without that); the weights' rounding is what remains
    quantized = export_gguf(model_dir, tmp_path / "out" / "model-q8_0.gguf", "q8_0")
    assert 0 < quantized.max_logit_diff <= quantized.tolerance
    assert quantized.max_logit_diff > result.max_logit_diff
    fields = _fields(result.path)
    expected = {"general.architecture": "qwen3moe", "qwen3moe.expert_count": 4,
                "qwen3moe.expert_used_count": 2, "qwen3moe.expert_feed_forward_length": 32}
    assert {k: fields[k] for k in expected} == expected
    tensors = _tensors(result.path)
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 32, 4]  # [in, out, experts]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [32, 64, 4]
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32
    assert not any(".experts." in name or "ffn_gate.weight" in name for name in tensors)
    weights = load_file(model_dir / "model.safetensors")
    stacked = np.array(tensors["blk.1.ffn_up_exps.weight"].data)  # [experts, out, in]
    for expert in range(4):
        original = weights[f"model.layers.1.mlp.experts.{expert}.up_proj.weight"]
        assert torch.equal(torch.from_numpy(stacked[expert]), original.half())


def test_bad_gguf_type_and_unsupported_architecture(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="--gguf 'q4_k'.*f16, q8_0"):
        write_gguf(llama_dir, tmp_path / "m.gguf", "q4_k")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2", "num_hidden_layers": 2}')
    with pytest.raises(ExportError) as caught:
        export_gguf(other, tmp_path / "out" / "m.gguf", "f16")
    message = str(caught.value)
    assert "\n" not in message and "config.json" in message and "'gpt2'" in message
    assert "llama, qwen3, qwen3_moe" in message
    assert not (tmp_path / "out" / "m.gguf").exists()
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text('{"model_type": "qwen3_moe", "num_hidden_layers": 2, '
                                     '"norm_topk_prob": true}')
    (moe / "config.json").write_text('{"model_type": "qwen3_moe", "num_hidden_layers": 2, '
                                     '"norm_topk_prob": false}')
    with pytest.raises(ExportError, match="norm_topk_prob false has no llama.cpp equivalent"):
        export_gguf(moe, tmp_path / "out" / "m.gguf", "f16")


def test_a_failed_check_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    from tinkerkit import export_gguf as module

    out = tmp_path / "out"
    out.mkdir()
    (out / "model-f16.gguf").write_bytes(b"earlier export")
    monkeypatch.setitem(module._TOLERANCE, "f16", (0.0, 0.0))
    with pytest.raises(ExportError, match="failed its check.*nothing was written"):
        export_gguf(llama_dir, out / "model-f16.gguf", "f16")
    assert (out / "model-f16.gguf").read_bytes() == b"earlier export"
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf"]


@pytest.mark.slow
def test_llama_cpp_runs_the_file_like_transformers(llama_dir, llama_f16, smol_tokenizer):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'tinkerkit[llama]')")
    prompt = smol_tokenizer.apply_chat_template(CHAT[:2], tokenize=False,
                                                add_generation_prompt=True)
    ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(llama_f16.path), n_ctx=256, logits_all=True,
                          verbose=False, n_threads=2)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    cpp_logits = torch.tensor(np.array(llm.scores[: len(ids)]))
    source = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = source(torch.tensor([ids])).logits[0]
        ours = source.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                               eos_token_id=None)[0, len(ids):].tolist()
    assert (cpp_logits - reference).abs().max().item() <= gguf_tolerance("f16", reference)
    llm.reset()
    greedy = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        greedy.append(token)
        if len(greedy) == 8:
            break
    assert greedy == ours


def test_cli_export_gguf_merges_and_writes_the_file(llama_dir, tmp_path, capsys):
    import json

    from peft import LoraConfig, get_peft_model

    from tinkerkit.cli import main

    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the model
                param.normal_(std=0.5)
    checkpoint = tmp_path / "ckpt"
    peft_model.save_pretrained(checkpoint)
    (checkpoint / "tinkerkit_state.json").write_text(json.dumps(
        {"format": 1, "kind": "state", "base_model": llama_dir, "rank": 4, "alpha": 8}))

    code = main(["export", str(checkpoint), "--output", str(tmp_path / "out"), "--gguf", "q8_0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert "GGUF (q8_0):" in printed and "model-q8_0.gguf" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter", "merged", "model-q8_0.gguf"]
    # the merged LoRA delta is in the file: its query rows are not the base model's
    base = load_file(f"{llama_dir}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    stored = _tensors(tmp_path / "out" / "model-q8_0.gguf")["blk.0.attn_q.weight"]
    values = torch.from_numpy(dequantize(stored.data, stored.tensor_type))
    assert (values - _naive_llama_permute(base, 4)).abs().max() > 0.1


def test_non_finite_weights_are_refused_by_name(llama_dir, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"tensor blk\.1\.ffn_down\.weight holds 1 NaN"):
        write_gguf(broken, tmp_path / "m.gguf", "f16")
