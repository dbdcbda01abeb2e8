"""A LoRA linear layer whose forward and backward passes fold the LoRA scaling into matrix products.

PEFT's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` through
autograd: besides the matrix products, every call makes elementwise passes over the ``[tokens,
out]`` output (the scaling, the sum, and the scaling again in the backward pass) and adds the
two input gradients (base and LoRA) in one more pass over ``[tokens, in]``. On a CPU these
memory-bound passes cost about as much as the rank-r products themselves.
:class:`FusedLoraLinear` is that layer with a forward that computes the same function with the
scaling inside ``addmm``: the LoRA product is added into the base output in place, and in the
backward pass the LoRA part of the input gradient is added into the base part in place. Values
and gradients equal PEFT's up to float rounding (bitwise where the scaling is a power of two).

It is used through PEFT's custom-module hook (``LoraConfig._register_custom_module``), so the
adapter's parameters, names, saved files, merging and unloading are PEFT's own; only the forward
pass differs, and it falls back to PEFT's whenever the fused one does not apply (dropout, DoRA or
another variant, a LoRA bias, several or disabled adapters, merged weights, mixed dtypes outside
autocast, extra arguments). Under autocast (:class:`MixedLoraLinearFunction`) the frozen base
product runs in the autocast dtype, as autocast runs a ``torch.nn.Linear``, but the LoRA update
is added in float32 and the output is float32, so that small updates are not rounded away; the
frozen base weight's cast is kept (:func:`autocast_weight`) instead of being redone on every
call, as autocast itself does only for weights that require gradients.

Example::

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    model = get_peft_model(model, config)
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class LoraLinearFunction(torch.autograd.Function):
    """``linear(x, weight, bias) + scaling * (x @ lora_a.T) @ lora_b.T`` for a frozen base layer.

    Inputs: ``x`` ``[..., in]``; ``weight`` ``[out, in]`` and ``bias`` ``[out]`` or None, both
    frozen (no gradient is returned for them); ``lora_a`` ``[r, in]``; ``lora_b`` ``[out, r]``;
    ``scaling`` a float (``lora_alpha / r``). All tensors of one dtype and device.
    Output: ``[..., out]``.

    Backward, with ``g`` the output gradient and ``h = x @ lora_a.T``: ``dx = g @ weight +
    scaling * (g @ lora_b) @ lora_a``, ``d lora_a = scaling * (g @ lora_b).T @ x``,
    ``d lora_b = scaling * g.T @ h`` (Hu et al. 2021, "LoRA", eq. 3, differentiated).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()  # [tokens, r]
        out = torch.nn.functional.linear(flat, weight, bias)  # [tokens, out], a new tensor
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        flat, down, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # [tokens, out]
        grad_down = grad @ lora_b  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(grad_down, lora_a, alpha=ctx.scaling)
            grad_x = grad_x.view(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_down.t() @ flat).mul_(ctx.scaling)
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ down).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None


class MixedLoraLinearFunction(torch.autograd.Function):
    """:class:`LoraLinearFunction` with the frozen base product in a low precision (bf16) and the
    LoRA update and the output in float32.

    Inputs: ``x`` ``[..., in]`` of any float dtype (cast to ``weight``'s); ``weight`` ``[out,
    in]`` and ``bias`` ``[out]`` or None in the low dtype (frozen); ``lora_a`` ``[r, in]`` and
    ``lora_b`` ``[out, r]`` float32; ``scaling`` a float. Output: float32 ``[..., out]``.

    ``linear(x, weight, bias)`` and ``x @ lora_a.T`` are low-precision products (bf16 matrix
    units); the LoRA term ``scaling * (x @ lora_a.T) @ lora_b.T`` is added to the base output in
    float32. Rounding the sum to bf16, as autocast does for a whole linear layer, would drop a
    LoRA update smaller than the output's bf16 spacing (2^-8 of its magnitude): early in
    training, when ``lora_b`` is near zero, that is most of the update, and the loss fell more
    slowly than in float32. Backward, with ``g`` the float32 output gradient: ``dx = g @ weight
    + scaling * (g @ lora_b) @ lora_a`` (the first product in the low precision),
    ``d lora_a = scaling * (g @ lora_b).T @ x`` (low precision), ``d lora_b = scaling * g.T @
    (x @ lora_a.T)`` (float32). On the CPU the low-precision operands' rows are padded with zeros
    to a multiple of :data:`ROW_BLOCK` (:func:`low_precision_rows`) and the extra output rows
    dropped, so that the products' shapes repeat from step to step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        low, tokens = weight.dtype, x.shape[:-1].numel()
        flat = low_precision_rows(x.reshape(tokens, x.shape[-1]), low)  # [rows, in], rows >= tokens
        down = (flat @ lora_a.to(low).t()).float()  # [rows, r]
        out = torch.nn.functional.linear(flat, weight, bias)[:tokens].float()  # [tokens, out]
        out.addmm_(down[:tokens], lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, down, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, x.shape, x.dtype
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the dtypes are chosen here, not by the caller's
    @torch.autocast("cuda", enabled=False)  # autocast (backward may run inside its context)
    def backward(ctx, grad_output: torch.Tensor):
        flat, down, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1]).float()  # [tokens, out]
        tokens, low = len(grad), weight.dtype
        grad_down = grad @ lora_b  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (low_precision_rows(grad, low) @ weight)[:tokens].float()
            grad_x.addmm_(grad_down, lora_a, alpha=ctx.scaling)
            grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[3]:
            # the rows past `tokens` are zero in both operands of this sum over rows
            grad_a = (low_precision_rows(grad_down, low).t() @ flat).float().mul_(ctx.scaling)
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ down[:tokens]).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None


ROW_BLOCK = 64
"""Rows of a low-precision matrix product's operand are padded to a multiple of this on the CPU.

PyTorch runs bf16 (and float16) products on the CPU through oneDNN, which builds a primitive for
every new operand shape (milliseconds: code is generated for the shape) and keeps up to 1,024 of
them, each holding memory (about 1 MiB). Training steps pack different numbers of tokens; with
rows in blocks of 64 the shapes repeat, so primitives are built in the first steps only and the
memory they hold stays bounded. The padding costs at most 63 rows per product
(docs/PERFORMANCE.md, "Matrix shapes under bf16 on the CPU").
"""


def low_precision_rows(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``matrix`` ``[n, k]`` cast to ``dtype`` for a matrix product, rows padded on the CPU.

    On the CPU the result is ``[m, k]`` with ``m`` = ``n`` rounded up to a multiple of
    :data:`ROW_BLOCK` and rows ``n:`` zero (zero rows add nothing where a product sums over rows,
    and a product's extra output rows are sliced off by the caller); elsewhere it is
    ``matrix.to(dtype)``, ``[n, k]``.
    """
    rows = len(matrix)
    if matrix.device.type != "cpu" or rows % ROW_BLOCK == 0:
        return matrix.to(dtype)
    padded = matrix.new_empty((rows + ROW_BLOCK - rows % ROW_BLOCK, matrix.shape[1]), dtype=dtype)
    padded[:rows].copy_(matrix)
    padded[rows:].zero_()
    return padded


def autocast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)`` for a frozen weight, computed once per value of the weight.

    The copy is kept on the weight itself (attribute ``_tinkerkit_cast``), so it goes with the
    weight and a model copy that shares its frozen weights (a sampling snapshot) shares the cast
    copies too. It is made anew when another dtype is asked for or the weight changed: another
    storage, or an in-place change that autograd tracks (its version counter moved on). Costs
    ``weight.numel()`` elements of ``dtype`` per weight (bf16 copies of float32 weights: half
    the weights' memory again).
    """
    key = (weight.data_ptr(), weight._version, dtype)
    cached = getattr(weight, "_tinkerkit_cast", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        cast = weight.to(dtype)
    weight._tinkerkit_cast = (key, cast)
    return cast


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` with the forward of :class:`LoraLinearFunction` where it applies."""

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused forward computes exactly what PEFT's would."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return False
        adapter = self.active_adapters[0]
        if (adapter not in self.lora_A or adapter in self.lora_variant
                or self.lora_bias[adapter] or self.fan_in_fan_out
                or not isinstance(self.lora_dropout[adapter], torch.nn.Identity)):
            return False
        base = self.get_base_layer()
        frozen = [p for p in base.parameters() if p.requires_grad] == []
        if torch.is_autocast_enabled(x.device.type):  # every operand is cast to one dtype
            return type(base) is torch.nn.Linear and frozen
        dtypes = {x.dtype, base.weight.dtype, self.lora_A[adapter].weight.dtype,
                  self.lora_B[adapter].weight.dtype}
        return type(base) is torch.nn.Linear and frozen and len(dtypes) == 1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._fusable(x):
            return super().forward(x, *args, **kwargs)
        adapter = self.active_adapters[0]
        base = self.get_base_layer()
        operands = (x, base.weight, base.bias, self.lora_A[adapter].weight,
                    self.lora_B[adapter].weight)
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return LoraLinearFunction.apply(*operands, self.scaling[adapter])
        # Under autocast the base product runs in the autocast dtype (bf16), the LoRA update is
        # added in float32 (MixedLoraLinearFunction: a bf16 sum would round small updates
        # away), and the output is float32; the LoRA weights get float32 gradients.
        dtype = torch.get_autocast_dtype(device)
        weight = autocast_weight(base.weight, dtype)
        bias = None if base.bias is None else autocast_weight(base.bias, dtype)
        with torch.autocast(device, enabled=False):
            return MixedLoraLinearFunction.apply(x, weight, bias, operands[3], operands[4],
                                                 self.scaling[adapter])
