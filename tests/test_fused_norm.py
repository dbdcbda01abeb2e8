"""The hand-differentiated RMSNorm against transformers' own layers and autograd."""

from __future__ import annotations

import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tinkerkit.engines.fused_norm import RMSNormFunction, fuse_rms_norms


def test_function_gradient_is_exact_in_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda t: RMSNormFunction.apply(t, weight, 1e-6), (x,))
    # one row by hand: x = [3, 4], weight = [1, 2]: mean(x^2) = 12.5, r = 1 / sqrt(12.5 + 0)
    out = RMSNormFunction.apply(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]), 0.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 8.0]) / 12.5 ** 0.5)


def test_fused_layers_equal_transformers_in_values_and_gradients():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    norm.weight.requires_grad_(False)
    fused = LlamaRMSNorm(16, eps=1e-5)
    fused.load_state_dict(norm.state_dict())
    fused.weight.requires_grad_(False)
    holder = torch.nn.Sequential(fused)
    assert fuse_rms_norms(holder) == 1 and type(fused).__name__ == "FusedLlamaRMSNorm"
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

    assert fuse_rms_norms(tiny(transformers.LlamaConfig)) == 2 * 2 + 1  # 2 per layer, final
    assert fuse_rms_norms(tiny(transformers.Qwen3Config)) == 2 * 4 + 1  # plus q_norm, k_norm
    gemma = tiny(transformers.Gemma3TextConfig)  # weight * (1 + x): not this function
    assert fuse_rms_norms(gemma) == 0

    class OffsetRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    assert fuse_rms_norms(torch.nn.Sequential(OffsetRMSNorm(8))) == 0
