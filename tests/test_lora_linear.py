"""The fused LoRA linear layer against PEFT's own ``lora.Linear``, in values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tinkerkit.engines.local.kernels.lora_linear import (
    ROW_BLOCK,
    FusedLoraLinear,
    LoraLinearFunction,
    MixedLoraLinearFunction,
    autocast_weight,
    low_precision_rows,
)


class TwoLayers(torch.nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = torch.nn.Linear(6, 10, bias=bias)
        self.down = torch.nn.Linear(10, 6, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def lora_pair(dropout: float = 0.0, bias: bool = False):
    """The same LoRA model twice: PEFT's layers and the fused ones, B non-zero."""
    torch.manual_seed(0)
    base = TwoLayers(bias)
    models = []
    for fused in (False, True):
        config = LoraConfig(r=3, lora_alpha=5, lora_dropout=dropout, target_modules=["up", "down"])
        if fused:
            config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), config)
        torch.manual_seed(2)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        models.append(model)
    return models


def run(model, x: torch.Tensor, seed: int = 3):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks for both
    out = model(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_equals_peft_in_values_and_gradients(bias):
    peft_model, fused_model = lora_pair(bias=bias)
    assert isinstance(fused_model.base_model.model.up, FusedLoraLinear)
    assert not isinstance(peft_model.base_model.model.up, FusedLoraLinear)
    x = torch.randn(2, 5, 6)
    out, grad_x, grads = run(peft_model, x)
    fused_out, fused_grad_x, fused_grads = run(fused_model, x)
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad_x, grad_x, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and len(grads) == 4  # A and B of up and down
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5)
    assert peft_model.state_dict().keys() == fused_model.state_dict().keys()


def test_function_gradients_are_exact_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    lora_a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    out = LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, 2.5)
    expected = x @ weight.T + bias + 2.5 * (x @ lora_a.T) @ lora_b.T
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(
        lambda x, a, b: LoraLinearFunction.apply(x, weight, bias, a, b, 2.5), (x, lora_a, lora_b))


def test_dropout_and_disabled_adapters_fall_back_to_peft():
    peft_model, fused_model = lora_pair(dropout=0.5)
    layer = fused_model.base_model.model.up
    x = torch.randn(2, 5, 6)
    assert not layer._fusable(x)  # dropout: PEFT's forward, the same dropout masks
    for a, b in zip(run(peft_model, x)[:2], run(fused_model, x)[:2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    _, fused_model = lora_pair()
    with fused_model.disable_adapter():
        assert not fused_model.base_model.model.up._fusable(x)
        base_out = fused_model(x)
    assert not torch.allclose(base_out, fused_model(x))  # the adapter is back on
    assert fused_model.base_model.model.up._fusable(x)


def test_fused_layer_under_bf16_autocast_is_as_close_to_float32_as_peft():
    peft_model, fused_model = lora_pair()
    x = torch.randn(4, 16, 6)
    assert fused_model.base_model.model.up._fusable(x)
    exact = run(peft_model, x)  # float32

    def error(result) -> list[float]:  # relative errors of output, input gradient, LoRA grads
        out, grad_x, grads = result
        pairs = [(out, exact[0]), (grad_x, exact[1])] + [(grads[n], exact[2][n]) for n in grads]
        return [((a.float() - b).norm() / b.norm()).item() for a, b in pairs]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_bf16, fused_bf16 = run(peft_model, x), run(fused_model, x)
    assert peft_bf16[0].dtype == torch.bfloat16  # PEFT's output is rounded to bf16
    assert fused_bf16[0].dtype == torch.float32  # ours: bf16 base product, float32 LoRA sum
    assert all(g.dtype == torch.float32 for g in fused_bf16[2].values())  # float32 weights
    peft_error, fused_error = error(peft_bf16), error(fused_bf16)
    assert len(fused_error) == 6 and 0 < max(fused_error) < 0.02  # bf16 rounding, no more
    # Fewer roundings (the output and the LoRA sum stay float32): no less accurate than PEFT.
    assert sum(fused_error) <= 1.5 * sum(peft_error)


def test_a_small_lora_update_survives_bf16_autocast():
    # Early in training lora_B is near zero: its update is far below the bf16 spacing of the
    # base output (2^-8 relative) and a bf16 sum would drop it; the float32 sum keeps it.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator)
    weight = torch.randn(6, 8, generator=generator).bfloat16()
    lora_a = torch.randn(2, 8, generator=generator)
    lora_b = torch.full((6, 2), 1e-5, requires_grad=True)
    out = MixedLoraLinearFunction.apply(x, weight, None, lora_a, lora_b, 2.0)
    base = (x.bfloat16() @ weight.t()).float()
    update = 2.0 * (x.bfloat16() @ lora_a.bfloat16().t()).float() @ lora_b.detach().t()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, base + update, rtol=1e-6, atol=1e-9)
    assert not torch.equal(out, base)  # the update is there
    assert torch.equal((base + update).bfloat16(), base.bfloat16())  # and bf16 would lose it
    grad = torch.linspace(-1, 1, 30).view(5, 6)
    (grad_b,) = torch.autograd.grad(out, lora_b, grad)
    down = (x.bfloat16() @ lora_a.bfloat16().t()).float()
    torch.testing.assert_close(grad_b, 2.0 * grad.t() @ down)  # float32, as computed by hand


def test_low_precision_rows_pads_cpu_operands_with_zero_rows():
    matrix = torch.tensor([[1.0, 1.0 + 2**-10], [-2.0, 3.0], [0.5, 0.25]])
    padded = low_precision_rows(matrix, torch.bfloat16)
    assert ROW_BLOCK == 64 and padded.shape == (64, 2) and padded.dtype == torch.bfloat16
    assert padded[:3].tolist() == [[1.0, 1.0], [-2.0, 3.0], [0.5, 0.25]]  # cast, bf16 rounding
    assert not padded[3:].any()
    full = torch.ones(128, 2)
    assert low_precision_rows(full, torch.bfloat16).shape == (128, 2)  # a whole number of blocks


def test_padded_rows_change_no_value_or_gradient():
    # 50 tokens are padded to 64 rows inside the function; the same 50 tokens followed by 14
    # zero rows (64 rows, no padding, the same product shapes) must give the same outputs and
    # gradients, bit for bit: the padding rows contribute nothing and are dropped.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator, requires_grad=True)
    weight = torch.randn(6, 8, generator=generator).bfloat16()
    lora_a = torch.randn(2, 8, generator=generator, requires_grad=True)
    lora_b = torch.randn(6, 2, generator=generator, requires_grad=True)
    grad = torch.randn(50, 6, generator=generator)
    out = MixedLoraLinearFunction.apply(x, weight, None, lora_a, lora_b, 2.0)
    padded_x = torch.cat([x.detach(), torch.zeros(14, 8)]).requires_grad_()
    padded_out = MixedLoraLinearFunction.apply(padded_x, weight, None, lora_a, lora_b, 2.0)
    grads = torch.autograd.grad(out, (x, lora_a, lora_b), grad)
    padded_grads = torch.autograd.grad(padded_out, (padded_x, lora_a, lora_b),
                                       torch.cat([grad, torch.zeros(14, 6)]))
    assert out.shape == (50, 6) and torch.equal(out, padded_out[:50])
    assert torch.equal(grads[0], padded_grads[0][:50])
    assert torch.equal(grads[1], padded_grads[1]) and torch.equal(grads[2], padded_grads[2])


def test_autocast_weight_is_cast_once_per_value_of_the_weight():
    weight = torch.nn.Parameter(torch.tensor([[1.0, 1.0 + 2**-10]]), requires_grad=False)
    first = autocast_weight(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and first.tolist() == [[1.0, 1.0]]  # bf16 rounding
    assert autocast_weight(weight, torch.bfloat16) is first  # kept, not cast again
    assert autocast_weight(weight, torch.float16).tolist() == [[1.0, 1.0 + 2**-10]]
    with torch.no_grad():
        weight.mul_(3.0)  # an in-place change moves the version counter on: cast anew
    assert autocast_weight(weight, torch.bfloat16).tolist() == [[3.0, 3.0]]
    weight.data = torch.tensor([[5.0, 7.0]])  # another storage
    assert autocast_weight(weight, torch.bfloat16).tolist() == [[5.0, 7.0]]
    cast = autocast_weight(weight, torch.bfloat16)
    snapshot = copy.deepcopy({"w": weight}, {id(weight): weight})["w"]  # as share_base_copy does
    assert snapshot is weight and autocast_weight(snapshot, torch.bfloat16) is cast
