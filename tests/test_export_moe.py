"""Export of MoE and foreign adapters: Tinker's layout, the streaming merge, the MoE adapters.

A tiny Qwen3-MoE (2 layers, hidden 32, 4 experts of width 16, the real Qwen vocabulary) is saved
in two on-disk layouts: per-expert keys (``experts.{e}.gate_proj.weight``, as transformers saves
Qwen3-MoE) and fused ones (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``,
its in-memory layout). Adapters are hand-built in Tinker's layout ("shared outer": the factor on
the hidden-size side has a leading 1) and every merged tensor is compared with a naive per-expert
computation ``W_e + (alpha / r) · B_e @ A_e`` written out here.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import save_tiny_llama
from tinkerkit.cli import main
from tinkerkit.engines.local.model import apply_adapter, load_model, merge_lora, read_adapter
from tinkerkit.errors import CheckpointError, ExportError
from tinkerkit.export import export_checkpoint, merge_adapter
from tinkerkit.models import load_tokenizer, qwen3_moe_tiny_config, save_random_model

RANK, ALPHA = 4, 16  # scale alpha / r = 4
H, FFN, E, LAYERS = 32, 16, 4, 2
PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _moe_config():
    return qwen3_moe_tiny_config(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, moe_intermediate_size=FFN,
                                 num_experts=E, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def per_expert_base(tmp_path_factory):
    """The tiny MoE as transformers saves it: one key per expert and projection."""
    path = tmp_path_factory.mktemp("moe") / "base"
    save_random_model(_moe_config(), path, load_tokenizer("qwen3-tokenizer"), seed=3)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in f.keys()
    return path


@pytest.fixture(scope="module")
def fused_base(per_expert_base, tmp_path_factory):
    """The same weights stored fused, as transformers 5 holds them in memory."""
    path = tmp_path_factory.mktemp("moe-fused") / "base"
    model = AutoModelForCausalLM.from_pretrained(per_expert_base)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    load_tokenizer("qwen3-tokenizer").save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              path / "model.safetensors", metadata={"format": "pt"})
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_shape() == [E, 2 * FFN, H]
    return path


def _tinker_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Tinker-layout adapter: attention q/v, every expert projection (shared outer factor),
    and the output head under Tinker's name ``model.unembed_tokens``."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    prefix = "base_model.model.model"
    tensors = {}
    for layer in range(LAYERS):
        for name, out in (("q_proj", 32), ("v_proj", 16)):
            tensors[f"{prefix}.layers.{layer}.self_attn.{name}.lora_A.weight"] = rand(RANK, H)
            tensors[f"{prefix}.layers.{layer}.self_attn.{name}.lora_B.weight"] = rand(out, RANK)
        experts = f"{prefix}.layers.{layer}.mlp.experts"
        for w in ("w1", "w3"):  # hidden side (A) shared by all experts
            tensors[f"{experts}.{w}.lora_A.weight"] = rand(1, RANK, H)
            tensors[f"{experts}.{w}.lora_B.weight"] = rand(E, FFN, RANK)
        tensors[f"{experts}.w2.lora_A.weight"] = rand(E, RANK, FFN)  # hidden side (B) shared
        tensors[f"{experts}.w2.lora_B.weight"] = rand(1, H, RANK)
    tensors[f"{prefix}.unembed_tokens.lora_A.weight"] = rand(RANK, H)
    tensors[f"{prefix}.unembed_tokens.lora_B.weight"] = rand(151936, RANK) * 0.1
    return tensors


def _write_adapter(path, tensors, base, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    fields = {"r": RANK, "lora_alpha": ALPHA, "base_model_name_or_path": str(base), **config}
    (path / "adapter_config.json").write_text(json.dumps(
        {k: v for k, v in fields.items() if v is not None}))
    return path


def _naive(base_tensor, a, b, expert):
    """W_e + (alpha / r) · B_e @ A_e for one expert, a shared factor (leading 1) used by all."""
    a_e = a[0] if a.shape[0] == 1 else a[expert]
    b_e = b[0] if b.shape[0] == 1 else b[expert]
    return base_tensor + (ALPHA / RANK) * (b_e @ a_e)


def _tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


@pytest.fixture(scope="module")
def input_ids():
    tokenizer = load_tokenizer("qwen3-tokenizer")
    chat = [{"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "12 + 30 = 42."}]
    return tokenizer(tokenizer.apply_chat_template(chat, tokenize=False),
                     add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_tinker_adapter_merges_into_per_expert_keys_as_the_naive_computation(per_expert_base,
                                                                              tmp_path):
    tensors = _tinker_tensors()
    adapter = _write_adapter(tmp_path / "adapter", tensors, per_expert_base)
    result = export_checkpoint(adapter, tmp_path / "out", merge=True, dtype="fp32",
                               logit_check=False)

    assert result.logit_check_skipped == "turned off (--no-logit-check)"
    assert result.max_logit_diff is None
    # 2 layers x (q, v, 4 experts x 3 projections) + lm_head
    assert result.merged_tensors == LAYERS * (2 + E * 3) + 1
    base, merged = _tensors(per_expert_base), _tensors(result.merged_dir)
    assert sorted(merged) == sorted(base)
    p = "base_model.model.model"
    for layer in range(LAYERS):
        for w, projection in PROJECTIONS.items():
            a = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_A.weight"]
            b = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_B.weight"]
            for e in range(E):
                key = f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight"
                expected = _naive(base[key], a, b, e)
                assert (merged[key] - expected).abs().max() <= 1e-6, key
                assert (merged[key] - base[key]).abs().max() > 0.1, key  # the delta is there
        gate = f"model.layers.{layer}.mlp.experts.1.gate_proj.weight"
        up = gate.replace("gate_proj", "up_proj")
        assert not torch.allclose(merged[gate] - base[gate], merged[up] - base[up], atol=0.1)
        router = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(merged[router], base[router])  # the router is not adapted
    head = base["lm_head.weight"] + (ALPHA / RANK) * (
        tensors[f"{p}.unembed_tokens.lora_B.weight"] @ tensors[f"{p}.unembed_tokens.lora_A.weight"])
    assert (merged["lm_head.weight"] - head).abs().max() <= 1e-6
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_tinker_adapter_merges_into_fused_keys_as_the_naive_computation(fused_base,
                                                                         per_expert_base,
                                                                         tmp_path):
    tensors = _tinker_tensors()
    adapter = _write_adapter(tmp_path / "adapter", tensors, fused_base)
    merged_dir, *_ = merge_adapter(adapter, tmp_path / "merged", dtype="fp32",
                                   logit_check=False)

    per_expert = _tensors(per_expert_base)  # the same weights, one key per expert
    base, merged = _tensors(fused_base), _tensors(merged_dir)
    assert sorted(merged) == sorted(base)
    p = "base_model.model.model"
    for layer in range(LAYERS):
        fused = f"model.layers.{layer}.mlp.experts"
        for w, projection in PROJECTIONS.items():
            a = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_A.weight"]
            b = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_B.weight"]
            for e in range(E):
                expected = _naive(per_expert[f"{fused}.{e}.{projection}.weight"], a, b, e)
                got = {"gate_proj": merged[f"{fused}.gate_up_proj"][e, :FFN],
                       "up_proj": merged[f"{fused}.gate_up_proj"][e, FFN:],
                       "down_proj": merged[f"{fused}.down_proj"][e]}[projection]
                assert (got - expected).abs().max() <= 1e-6, (layer, w, e)


def test_merged_moe_logits_equal_base_plus_naive_deltas(per_expert_base, fused_base, tmp_path,
                                                        input_ids):
    """Both on-disk layouts load into transformers as the same model: the base model with each
    expert's delta added to its fused parameters in memory, naively."""
    tensors = _tinker_tensors()
    reference = AutoModelForCausalLM.from_pretrained(per_expert_base).eval()
    p = "base_model.model.model"
    with torch.no_grad():
        for layer in range(LAYERS):
            experts = reference.model.layers[layer].mlp.experts
            for w, projection in PROJECTIONS.items():
                a = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_A.weight"]
                b = tensors[f"{p}.layers.{layer}.mlp.experts.{w}.lora_B.weight"]
                for e in range(E):
                    target = {"gate_proj": experts.gate_up_proj[e, :FFN],
                              "up_proj": experts.gate_up_proj[e, FFN:],
                              "down_proj": experts.down_proj[e]}[projection]
                    target.copy_(_naive(target.clone(), a, b, e))
            for name in ("q_proj", "v_proj"):
                layer_p = f"{p}.layers.{layer}.self_attn.{name}"
                weight = getattr(reference.model.layers[layer].self_attn, name).weight
                weight += (ALPHA / RANK) * (tensors[f"{layer_p}.lora_B.weight"]
                                            @ tensors[f"{layer_p}.lora_A.weight"])
        reference.lm_head.weight += (ALPHA / RANK) * (
            tensors[f"{p}.unembed_tokens.lora_B.weight"]
            @ tensors[f"{p}.unembed_tokens.lora_A.weight"])
    expected = _logits(reference, input_ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(per_expert_base), input_ids)
    for base in (per_expert_base, fused_base):
        adapter = _write_adapter(tmp_path / base.parent.name, tensors, base)
        merged_dir, *_ = merge_adapter(adapter, tmp_path / base.parent.name / "merged",
                                       dtype="fp32", logit_check=False)
        logits = _logits(AutoModelForCausalLM.from_pretrained(merged_dir), input_ids)
        print(f"{base.parent.name}: max |logit diff| vs base + naive deltas "
              f"{(logits - expected).abs().max():.3g}")
        assert (logits - expected).abs().max() <= 1e-4
        assert (logits - base_logits).abs().max() > 1.0  # the adapter does change the model


def test_peft_adapter_output_reproduces_the_merged_model(per_expert_base, tmp_path, input_ids,
                                                         caplog):
    tensors = _tinker_tensors()
    adapter = _write_adapter(tmp_path / "adapter", tensors, per_expert_base)
    result = export_checkpoint(adapter, tmp_path / "out", merge=True, dtype="fp32",
                               logit_check=False)

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["rank_pattern"] == {r"experts\.gate_up_proj": 2 * RANK}
    assert config["alpha_pattern"] == {r"experts\.gate_up_proj": 2 * ALPHA}
    assert config["target_modules"] == ["lm_head"] + [  # Tinker's config names none: the paths
        f"model.layers.{i}.self_attn.{name}" for i in range(LAYERS) for name in ("q_proj", "v_proj")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(per_expert_base),
                                           result.adapter_dir).eval()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    diff = (_logits(loaded, input_ids) - _logits(merged, input_ids)).abs().max()
    print(f"PEFT adapter/ vs merged (fp32): max |logit diff| {diff:.3g}")
    assert diff <= 1e-4
    # and PEFT's own merge of that adapter lands on the same weights as ours
    peft_merged = loaded.merge_and_unload()
    ours = merged.model.layers[1].mlp.experts
    assert torch.allclose(peft_merged.model.layers[1].mlp.experts.gate_up_proj,
                          ours.gate_up_proj, atol=1e-6)
    assert torch.allclose(peft_merged.model.layers[1].mlp.experts.down_proj, ours.down_proj,
                          atol=1e-6)


def test_vllm_adapter_holds_one_pair_per_expert(per_expert_base, tmp_path):
    tensors = _tinker_tensors()
    adapter = _write_adapter(tmp_path / "adapter", tensors, per_expert_base)
    result = export_checkpoint(adapter, tmp_path / "out")

    vllm = load_file(result.vllm_adapter_dir / "adapter_model.safetensors")
    p = "base_model.model.model.layers.1.mlp.experts"
    for e in range(E):
        assert torch.equal(vllm[f"{p}.{e}.gate_proj.lora_A.weight"], tensors[f"{p}.w1.lora_A.weight"][0])
        assert torch.equal(vllm[f"{p}.{e}.up_proj.lora_B.weight"], tensors[f"{p}.w3.lora_B.weight"][e])
        assert torch.equal(vllm[f"{p}.{e}.down_proj.lora_A.weight"], tensors[f"{p}.w2.lora_A.weight"][e])
        assert torch.equal(vllm[f"{p}.{e}.down_proj.lora_B.weight"], tensors[f"{p}.w2.lora_B.weight"][0])
    assert len(vllm) == 2 * (LAYERS * (2 + 3 * E) + 1)
    config = json.loads((result.vllm_adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "lm_head", "q_proj", "up_proj",
                                        "v_proj"]


def test_streaming_merge_of_a_multi_shard_model_equals_the_in_memory_merge(tmp_path):
    """Dense: shards of ~100 kB, merged in bf16, against PEFT's merge of the whole model in
    memory (float32, cast once): bitwise."""
    base = save_tiny_llama(tmp_path / "one", tied=False, width=64, initializer_range=0.02)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="3MB")
    load_tokenizer("smollm2-135m-instruct").save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    torch.manual_seed(2)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(sharded), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")

    merged_dir, diff, tolerance, skipped, count = merge_adapter(
        tmp_path / "adapter", tmp_path / "merged", dtype="bf16", base_model=str(sharded))
    assert skipped is None and diff <= tolerance and count == 2 * 2 + 1
    out_index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(out_index["weight_map"].values())) == shards
    assert out_index["weight_map"] == index["weight_map"]
    streamed = _tensors(merged_dir)
    assert out_index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in streamed.values())
    in_memory = merge_lora(apply_adapter(load_model(str(sharded)), read_adapter(
        tmp_path / "adapter"), share_base=False), tmp_path / "adapter").to(torch.bfloat16)
    expected = in_memory.state_dict()
    assert sorted(streamed) == sorted(expected)
    for key, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[key]), key


def test_streaming_merge_of_moe_shards_equals_the_single_file_merge(per_expert_base, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(per_expert_base).save_pretrained(
        sharded, max_shard_size="5MB")
    load_tokenizer("qwen3-tokenizer").save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    adapter = _write_adapter(tmp_path / "adapter", _tinker_tensors(), per_expert_base)
    one, *_ = merge_adapter(adapter, tmp_path / "one", dtype="bf16", logit_check=False)
    many, *_ = merge_adapter(adapter, tmp_path / "many", dtype="bf16", base_model=str(sharded),
                             logit_check=False)
    single, split = _tensors(one), _tensors(many)
    assert sorted(single) == sorted(split)
    assert all(torch.equal(single[k], split[k]) for k in single)


def _broken(tmp_path, base, change):
    tensors = _tinker_tensors()
    config = {}
    change(tensors, config)
    return _write_adapter(tmp_path / "broken", tensors, base, **config)


P = "base_model.model.model.layers.1"


@pytest.mark.parametrize("change, error, message", [
    (lambda t, c: t.update({f"{P}.mlp.experts.w4.lora_A.weight": torch.zeros(1, RANK, H),
                            f"{P}.mlp.experts.w4.lora_B.weight": torch.zeros(E, FFN, RANK)}),
     ExportError, f"'{P}.mlp.experts.w4.lora_A.weight' lands nowhere: base model "),
    (lambda t, c: t.update({f"{P}.mlp.experts.w3.lora_B.weight": torch.zeros(E, FFN + 1, RANK)}),
     ExportError, f"'{P}.mlp.experts.w3.lora_A.weight' does not fit base model "),
    (lambda t, c: t.update({f"{P}.mlp.experts.w1.lora_B.weight": torch.zeros(E + 1, FFN, RANK)}),
     ExportError, f"'{P}.mlp.experts.w1.lora_A.weight' is for 5 experts; the base model has 4"),
    (lambda t, c: t.pop(f"{P}.self_attn.q_proj.lora_B.weight"),
     ExportError, f"'{P}.self_attn.q_proj.lora_B.weight' is missing"),
    (lambda t, c: c.update(lora_alpha=None),
     CheckpointError, "adapter_config.json: field 'lora_alpha' is missing"),
])
def test_bad_adapters_are_one_line_errors_naming_file_and_key(per_expert_base, tmp_path, change,
                                                              error, message, capsys):
    adapter = _broken(tmp_path, per_expert_base, change)
    with pytest.raises(error) as info:
        merge_adapter(adapter, tmp_path / "merged", logit_check=False)
    assert message in str(info.value)
    assert str(adapter) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "merged").exists()
    assert main(["export", str(adapter), "--output", str(tmp_path / "out"), "--merge"]) == 1
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_cli_exports_a_tinker_adapter_and_reports_the_skipped_check(per_expert_base, tmp_path,
                                                                    capsys):
    adapter = _write_adapter(tmp_path / "adapter", _tinker_tensors(), per_expert_base)
    assert main(["export", str(adapter), "--output", str(tmp_path / "out"), "--merge",
                 "--dtype", "bf16", "--no-logit-check"]) == 0

    out = capsys.readouterr().out
    assert "Logit check skipped: turned off (--no-logit-check)" in out
    assert f"{LAYERS * (2 + 3 * E) + 1} tensors merged" in out
    card = (tmp_path / "out" / "merged" / "README.md").read_text()
    assert "| logit check | skipped: turned off (--no-logit-check) |" in card
    config = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("layout", ["per_expert_base", "fused_base"])
def test_moe_export_matches_the_engines_base_plus_adapter(layout, request, tmp_path, input_ids):
    """The end-to-end check against the local engine's expert LoRA: the merged model (bf16 and
    fp32, routed as the float32 reference, see export.moe_routing) and the PEFT adapter/."""
    base = request.getfixturevalue(layout)
    adapter = _write_adapter(tmp_path / "adapter", _tinker_tensors(), base)
    engine = apply_adapter(load_model(str(base)), read_adapter(adapter))
    expected = _logits(engine, input_ids)

    for dtype, bound in (("fp32", 1e-4), ("bf16", None)):
        result = export_checkpoint(adapter, tmp_path / dtype, merge=True, dtype=dtype)
        print(f"{layout} {dtype}: merged vs base + adapter (engine): max |logit diff| "
              f"{result.max_logit_diff:.3g}, tolerance {result.tolerance:.3g}")
        assert result.logit_check_skipped is None
        assert result.max_logit_diff <= (bound or result.tolerance)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     result.adapter_dir).eval()
    diff = (_logits(peft, input_ids) - expected).abs().max()
    print(f"{layout}: PEFT adapter/ vs base + adapter (engine): max |logit diff| {diff:.3g}")
    assert diff <= 1e-4


def test_tinker_unembed_tokens_on_a_tied_model_unties_the_head(tmp_path, input_ids):
    """Dense, Tinker's names, a tied model: ``model.unembed_tokens`` is the output head, which
    reads the input embedding; the merge writes ``lm_head.weight`` = embedding + delta, keeps the
    embedding, and passes the logit check against the engine."""
    base = save_tiny_llama(tmp_path / "base", tied=True, width=64, initializer_range=0.02)
    g = torch.Generator().manual_seed(5)
    tensors = {"base_model.model.model.unembed_tokens.lora_A.weight": torch.randn(RANK, 64,
                                                                                 generator=g),
               "base_model.model.model.unembed_tokens.lora_B.weight": torch.randn(
                   49152, RANK, generator=g) * 0.05,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
                   RANK, 64, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
                   64, RANK, generator=g)}
    adapter = _write_adapter(tmp_path / "adapter", tensors, base, target_modules="all-linear")
    result = export_checkpoint(adapter, tmp_path / "out", merge=True, dtype="fp32")

    print(f"tied head, Tinker names: max |logit diff| {result.max_logit_diff:.3g}")
    assert result.max_logit_diff <= 1e-4 and result.merged_tensors == 2
    merged, original = _tensors(result.merged_dir), _tensors(Path(base))
    assert "lm_head.weight" not in original
    expected = original["model.embed_tokens.weight"] + (ALPHA / RANK) * (
        tensors["base_model.model.model.unembed_tokens.lora_B.weight"]
        @ tensors["base_model.model.model.unembed_tokens.lora_A.weight"])
    assert (merged["lm_head.weight"] - expected).abs().max() <= 1e-6
    assert torch.equal(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert json.loads((result.merged_dir / "config.json").read_text())[
        "tie_word_embeddings"] is False
    exported = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_A.weight" in exported  # PEFT's name in adapter/
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())[
        "target_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj"]  # layer 0 only
