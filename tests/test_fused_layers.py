"""The hand-differentiated RMSNorm and rotary embedding against transformers' layers and autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm

from tinkerkit.engines.local.kernels.fused_layers import (
    RMSNormFunction,
    RotaryFunction,
    fuse_layers,
)


def test_function_gradient_is_exact_in_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda t: RMSNormFunction.apply(t, weight, 1e-6), (x,))
    # one row by hand: x = [3, 4], weight = [1, 2]: mean(x^2) = 12.5, r = 1 / sqrt(12.5 + 0)
    out = RMSNormFunction.apply(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]), 0.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 8.0]) / 12.5 ** 0.5)


def frozen_norm() -> LlamaRMSNorm:
    """A Llama RMSNorm of width 16 with a random frozen weight (seed 0), as under LoRA."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    norm.weight.requires_grad_(False)
    return norm


def test_fused_layers_equal_transformers_in_values_and_gradients():
    norm = frozen_norm()
    fused = LlamaRMSNorm(16, eps=1e-5)
    fused.load_state_dict(norm.state_dict())
    fused.weight.requires_grad_(False)
    holder = torch.nn.Sequential(fused)
    assert fuse_layers(holder) == {"rms_norm": 1, "attention": 0}
    assert type(fused).__name__ == "FusedLlamaRMSNorm"
    assert isinstance(fused, LlamaRMSNorm)  # still the layer it was (state dict, repr, ...)
    x = (torch.randn(3, 7, 16) * 4).requires_grad_()
    grad = torch.randn(3, 7, 16)
    expected = norm(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    actual = fused(x)
    (actual_grad,) = torch.autograd.grad(actual, x, grad)
    assert actual.grad_fn.name() == "RMSNormFunctionBackward"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-6)
    # bf16 input, or a trained weight: the layer's own forward
    half = x.detach().bfloat16()
    assert torch.equal(fused(half), norm(half))
    fused.weight.requires_grad_(True)
    assert fused(x).grad_fn.name() == norm(x).grad_fn.name() != "RMSNormFunctionBackward"


def test_models_norms_are_fused_unless_they_compute_something_else():
    def tiny(config_class):
        config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8)
        return transformers.AutoModelForCausalLM.from_config(config)

    assert fuse_layers(tiny(transformers.LlamaConfig)) == {"rms_norm": 2 * 2 + 1, "attention": 2}
    qwen3 = {"rms_norm": 2 * 4 + 1, "attention": 2}  # q_norm and k_norm too
    assert fuse_layers(tiny(transformers.Qwen3Config)) == qwen3
    gemma = tiny(transformers.Gemma3TextConfig)  # norms: weight * (1 + x), not this function
    assert fuse_layers(gemma) == {"rms_norm": 0, "attention": 2}

    class OffsetRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    assert fuse_layers(torch.nn.Sequential(OffsetRMSNorm(8)))["rms_norm"] == 0

    class ScaledLlamaAttention(LlamaAttention):  # a variant: not what the fused forward computes
        def forward(self, hidden_states, *args, **kwargs):
            output, weights = super().forward(hidden_states, *args, **kwargs)
            return output * 2, weights

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8)
    config._attn_implementation = "sdpa"
    assert fuse_layers(ScaledLlamaAttention(config, 0))["attention"] == 0


def test_attention_with_large_outputs_is_fused():
    # Deep layers of real models give large outputs on the check's random input (SmolLM2-135M:
    # ~100 in 5 of its 30 attention layers, which an element-wise tolerance left unfused for
    # rounding differences of ~1e-4); the check compares against the size of the output.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9,
                                      num_key_value_heads=3, head_dim=64)  # SmolLM2's widths
    config._attn_implementation = "sdpa"
    attention = LlamaAttention(config, 0)
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            projection.weight.mul_(30.0)  # outputs of ~1,000, rounding differences of ~1e-3
    assert fuse_layers(attention)["attention"] == 1


def test_rotary_gradient_is_exact_in_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    angles = torch.randn(1, 1, 5, 8, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda t: RotaryFunction.apply(t, angles.cos(), angles.sin()),
                                    (x,))
    # [a, b] rotated by theta (halves of one pair): [a cos - b sin, b cos + a sin]
    theta = torch.tensor(0.5)
    out = RotaryFunction.apply(torch.tensor([[[[1.0, 2.0]]]]), theta.cos().expand(1, 1, 1, 2),
                               theta.sin().expand(1, 1, 1, 2))
    expected = torch.tensor([theta.cos() - 2 * theta.sin(), 2 * theta.cos() + theta.sin()])
    torch.testing.assert_close(out.flatten(), expected)


@pytest.mark.parametrize("config_class", [transformers.LlamaConfig, transformers.Qwen3Config])
def test_fused_model_equals_the_original_in_values_and_input_gradients(config_class):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8)
    original = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    original.requires_grad_(False)  # frozen, as under LoRA
    fused = copy.deepcopy(original)
    assert fuse_layers(fused) == {"rms_norm": 5 if config_class is transformers.LlamaConfig
                                  else 9, "attention": 2}
    embeds = torch.randn(2, 7, 32, requires_grad=True)
    grad = torch.randn(2, 7, 64)
    results = []
    for model in (original, fused):
        logits = model(inputs_embeds=embeds).logits
        (embeds_grad,) = torch.autograd.grad(logits, embeds, grad)
        results.append((logits, embeds_grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)


def test_norm_under_autocast_rounds_its_float32_output_once_to_bf16():
    norm = frozen_norm()
    fuse_layers(torch.nn.Sequential(norm))
    x = (torch.randn(3, 7, 16) * 4).requires_grad_()
    grad = torch.randn(3, 7, 16).bfloat16()
    full = norm(x)
    (full_grad,) = torch.autograd.grad(full, x, grad.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = norm(x)
    (half_grad,) = torch.autograd.grad(half, x, grad)
    assert half.dtype == torch.bfloat16 and half_grad.dtype == torch.float32
    assert torch.equal(half, full.detach().bfloat16())  # computed in float32, rounded once
    assert torch.equal(half_grad, full_grad)  # the same float32 arithmetic on the same gradient
