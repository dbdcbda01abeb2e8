"""Export of LoRA checkpoints: adapter directory round trip through PEFT, merges and their checks.

Checkpoints are made here with PEFT directly, in the layout of ``tinkerkit.checkpoint``, on tiny
random Llama models (2 layers, width 64) that use the real SmolLM2 tokenizer (49,152 ids).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import save_tiny_llama
from tinkerkit import export
from tinkerkit.errors import CheckpointError, ConfigError, ExportError
from tinkerkit.export import export_adapter, export_checkpoint, merge_adapter
from tinkerkit.models import load_tokenizer

RANK, ALPHA = 4, 8  # LoRA scale alpha / r = 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    chat = [{"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "12 + 30 = 42."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _make_base(path, tokenizer, tied: bool, width: int = 64):
    return save_tiny_llama(path, tied=tied, width=width, initializer_range=0.02)


def _make_checkpoint(path, base_dir, targets, base_model=None):
    """A checkpoint as the local engine writes it; returns the PEFT model that produced it."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                  target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initializes B to zero: a no-op adapter
                param.normal_(std=0.5)
    peft_model.save_pretrained(path)
    save_file({"base_model.model.x.lora_A.weight.exp_avg": torch.zeros(2)},
              path / "optimizer.safetensors")
    state = {"format": 1, "kind": "state", "base_model": base_model or str(base_dir),
             "rank": RANK, "alpha": ALPHA, "optimizer_step": 3}
    (path / "tinkerkit_state.json").write_text(json.dumps(state))
    return peft_model.eval()


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("untied")
    base_dir = _make_base(root / "base", tokenizer, tied=False)
    peft_model = _make_checkpoint(root / "ckpt", base_dir, ["q_proj", "v_proj"])
    return base_dir, root / "ckpt", peft_model


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, tokenizer):
    return _make_base(tmp_path_factory.mktemp("tied") / "base", tokenizer, tied=True)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


def test_export_adapter_writes_a_self_contained_peft_adapter(untied, tmp_path, tokenizer):
    base_dir, ckpt, _ = untied
    out = export_adapter(ckpt, tmp_path / "adapter")

    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "optimizer.safetensors" not in names and "tinkerkit_state.json" not in names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    original, exported = load_file(ckpt / "adapter_model.safetensors"), load_file(
        out / "adapter_model.safetensors")
    assert sorted(exported) == sorted(original)
    assert len(exported) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    card = (out / "README.md").read_text()
    assert "| rank (r) | 4 |" in card and "q_proj, v_proj" in card and "PeftModel" in card


def test_exported_adapter_loads_in_peft_with_identical_logits(untied, tmp_path, input_ids,
                                                              caplog):
    base_dir, ckpt, peft_model = untied
    out = export_adapter(ckpt, tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, out).eval()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    result = loaded.load_adapter(out, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(_logits(loaded, input_ids), _logits(peft_model, input_ids))
    # the adapter is not a no-op: it moves the logits of the base model
    plain = AutoModelForCausalLM.from_pretrained(base_dir)  # from_pretrained wrapped `base`
    assert (_logits(peft_model, input_ids) - _logits(plain, input_ids)).abs().max() > 0.1


def test_export_records_the_hub_id_of_a_registry_base_model(untied, tmp_path):
    base_dir, ckpt, _ = untied
    registry_ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt, registry_ckpt)
    state = json.loads((registry_ckpt / "tinkerkit_state.json").read_text())
    state["base_model"] = "smollm2-135m-instruct"
    (registry_ckpt / "tinkerkit_state.json").write_text(json.dumps(state))

    out = export_adapter(registry_ckpt, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()


def test_merge_fp32_matches_base_plus_adapter(untied, tmp_path, tokenizer, input_ids):
    base_dir, ckpt, peft_model = untied
    out, diff, tolerance, *_ = merge_adapter(ckpt, tmp_path / "merged", dtype="fp32")

    print(f"fp32 merge: max |logit diff| {diff:.3g}, tolerance {tolerance:.3g}")
    assert diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    assert (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    assert torch.allclose(_logits(merged, input_ids), _logits(peft_model, input_ids), atol=1e-4)
    # W' = W + (alpha / r) * B @ A  (LoRA, arXiv 2106.09685, §4.1)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = load_file(ckpt / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    expected = base.model.layers[1].self_attn.q_proj.weight + 2.0 * (
        lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"])
    assert torch.allclose(merged.model.layers[1].self_attn.q_proj.weight, expected, atol=1e-6)
    assert torch.equal(merged.model.layers[1].self_attn.k_proj.weight,
                       base.model.layers[1].self_attn.k_proj.weight)


def test_merge_bf16_is_stored_in_bf16_and_within_tolerance(untied, tmp_path):
    _, ckpt, _ = untied
    out, diff, tolerance, *_ = merge_adapter(ckpt, tmp_path / "merged", dtype="bf16")

    print(f"bf16 merge: max |logit diff| {diff:.3g}, tolerance {tolerance:.3g}")
    assert 0 < diff <= tolerance
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_logit_tolerance_scales_with_dtype_roundoff_and_logits():
    logits = torch.tensor([[-40.0, 3.0]])
    assert export.logit_tolerance("bf16", logits) == 8 * 2**-8 * 40  # 1.25
    assert export.logit_tolerance("fp16", logits) == 8 * 2**-11 * 40
    assert export.logit_tolerance("fp32", logits) == 2**10 * 2**-24 * 40
    assert export.logit_tolerance("fp32", torch.tensor([0.1])) == 2**-14  # scale floor 1


def test_merge_keeps_tied_embeddings_tied(tied_base, tmp_path, input_ids):
    peft_model = _make_checkpoint(tmp_path / "ckpt", tied_base, ["q_proj", "v_proj"])
    out, diff, *_ = merge_adapter(tmp_path / "ckpt", tmp_path / "merged", dtype="fp32")

    assert diff < 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(_logits(merged, input_ids), _logits(peft_model, input_ids), atol=1e-4)


def test_merge_unties_embeddings_when_the_adapter_changes_lm_head(tied_base, tmp_path,
                                                                   input_ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapting a tied layer
        peft_model = _make_checkpoint(tmp_path / "ckpt", tied_base, ["q_proj", "lm_head"])
    out, diff, *_ = merge_adapter(tmp_path / "ckpt", tmp_path / "merged", dtype="fp32")

    assert diff < 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tied_base)
    lora = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    delta = 2.0 * (lora["base_model.model.lm_head.lora_B.weight"]
                   @ lora["base_model.model.lm_head.lora_A.weight"])
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.allclose(merged.lm_head.weight, base.lm_head.weight + delta, atol=1e-6)
    assert torch.allclose(_logits(merged, input_ids), _logits(peft_model, input_ids), atol=1e-4)


def test_merge_from_an_exported_adapter_dir(untied, tmp_path):
    _, ckpt, _ = untied
    adapter = export_adapter(ckpt, tmp_path / "adapter")
    _, diff, *_ = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    assert diff < 1e-4


def test_adapter_dir_with_a_registry_hub_id_resolves_to_the_registry_name(tmp_path):
    config = LoraConfig(r=4, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    config.save_pretrained(tmp_path)
    assert export._base_model(tmp_path, None) == "smollm2-135m-instruct"


def test_an_adapter_that_names_no_base_model_takes_one_from_the_command_line(untied, tmp_path):
    base_dir, ckpt, _ = untied
    anonymous = tmp_path / "anonymous"
    shutil.copytree(ckpt, anonymous)
    (anonymous / "tinkerkit_state.json").unlink(missing_ok=True)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (anonymous / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        export_checkpoint(anonymous, tmp_path / "refused")
    assert str(error.value) == (f"{anonymous / 'adapter_config.json'}: no base_model_name_or_path; "
                                "name the base model (tinkerkit export --model NAME, or "
                                "base_model=)")
    result = export_checkpoint(anonymous, tmp_path / "named", merge=True, dtype="fp32",
                               base_model=str(base_dir))
    assert result.max_logit_diff < 1e-4
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base_dir)


def test_export_checkpoint_writes_adapter_and_merged(untied, tmp_path):
    _, ckpt, _ = untied
    result = export_checkpoint(ckpt, tmp_path / "out", merge=True, dtype="fp16")

    assert result.adapter_dir == tmp_path / "out" / "adapter"
    assert result.merged_dir == tmp_path / "out" / "merged"
    assert result.dtype == "fp16" and 0 < result.max_logit_diff <= result.tolerance
    assert (result.merged_dir / "model.safetensors").is_file()
    assert export_checkpoint(ckpt, tmp_path / "only").merged_dir is None


def test_nan_in_lora_b_is_refused_naming_the_tensor(untied, tmp_path):
    _, ckpt, _ = untied
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")

    with pytest.raises(ExportError, match=f"tensor '{key}' has 1 non-finite"):
        export_adapter(broken, tmp_path / "adapter")
    with pytest.raises(ExportError, match="non-finite"):
        merge_adapter(broken, tmp_path / "merged")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "merged").exists()


def test_missing_weights_file_is_a_one_line_checkpoint_error(untied, tmp_path):
    _, ckpt, _ = untied
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "adapter_model.safetensors").unlink()

    for call in (lambda: export_adapter(broken, tmp_path / "a"),
                 lambda: merge_adapter(broken, tmp_path / "m")):
        with pytest.raises(CheckpointError) as info:
            call()
        assert "adapter_model.safetensors is missing" in str(info.value)
        assert "\n" not in str(info.value)


def test_corrupt_weights_file_is_a_checkpoint_error(untied, tmp_path):
    _, ckpt, _ = untied
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is corrupted"):
        export_adapter(broken, tmp_path / "adapter")


def test_rank_disagreeing_with_state_file_is_refused(untied, tmp_path):
    _, ckpt, _ = untied
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    state = json.loads((broken / "tinkerkit_state.json").read_text())
    (broken / "tinkerkit_state.json").write_text(json.dumps({**state, "rank": 8}))
    with pytest.raises(CheckpointError, match="field 'rank' is 8 but adapter_config.json says 4"):
        export_adapter(broken, tmp_path / "adapter")


def test_failed_merge_check_leaves_the_previous_export_in_place(untied, tmp_path, monkeypatch):
    _, ckpt, _ = untied
    out = tmp_path / "merged"
    merge_adapter(ckpt, out, dtype="fp32")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(export, "logit_tolerance", lambda dtype, logits: 0.0)

    with pytest.raises(ExportError, match="failed its check"):
        merge_adapter(ckpt, out, dtype="bf16")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging left


def test_adapter_for_another_base_model_is_refused(untied, tmp_path, tokenizer):
    _, ckpt, _ = untied
    narrower = _make_base(tmp_path / "narrower", tokenizer, tied=False, width=32)
    with pytest.raises(ExportError, match="does not fit base model"):
        merge_adapter(ckpt, tmp_path / "merged", base_model=str(narrower))
    assert not (tmp_path / "merged").exists()


def test_unknown_dtype_is_a_config_error(untied, tmp_path):
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        export_checkpoint(untied[1], tmp_path, merge=True, dtype="int8")


@pytest.mark.slow
def test_merge_real_smollm2_in_bf16(tmp_path):
    from tinkerkit.engines.local.model import load_model

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(load_model("smollm2-135m-instruct"),
                                LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tinkerkit_state.json").write_text(json.dumps(
        {"format": 1, "kind": "state", "base_model": "smollm2-135m-instruct", "rank": 8,
         "alpha": 16}))
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "out", merge=True, dtype="bf16")
    print(f"smollm2 bf16 merge: max |logit diff| {result.max_logit_diff:.3g}, "
          f"tolerance {result.tolerance:.3g}")
    assert result.max_logit_diff <= result.tolerance
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_refuses_an_output_inside_the_checkpoint(tmp_path):
    from tinkerkit.errors import ExportError
    from tinkerkit.export import export_checkpoint

    checkpoint = tmp_path / "step_000001"
    checkpoint.mkdir()
    (checkpoint / "marker").write_text("kept")
    with pytest.raises(ExportError, match="inside the checkpoint"):
        export_checkpoint(checkpoint, checkpoint / "out")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["marker"]
