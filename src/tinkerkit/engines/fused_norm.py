"""RMSNorm with a hand-written backward pass: fewer passes over the activations than autograd's.

transformers' RMSNorm layers (Llama, Qwen2, Qwen3, Mistral, ...) compute
``weight * x / sqrt(mean(x**2) + eps)`` as six elementwise and reduction operations, and autograd
differentiates each of them, so one layer makes about a dozen passes over a ``[tokens, hidden]``
tensor; on a CPU these memory-bound passes cost about as much as a small matrix product.
:class:`RMSNormFunction` computes the same function with one reduction and two multiplications,
and its gradient with respect to ``x`` (the weight is frozen under LoRA) with three more passes:
about 2.6x faster forward and backward on ``[860, 576]`` float32 (SmolLM2), equal to
transformers' within float rounding.

:func:`fuse_rms_norms` switches the RMSNorm layers of a model to it, each only after checking
on a random input that it computes what the layer's own forward does; a layer whose weight is
trained, or an input that is not float32, falls back to the layer's own forward.
"""

from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    """``weight * x * rsqrt(mean(x**2, -1) + eps)`` with a frozen ``weight``.

    Inputs: ``x`` float32 ``[..., H]``; ``weight`` float32 ``[H]`` (no gradient is returned for
    it); ``eps`` a float. Output: float32 ``[..., H]``.

    Backward, with ``r = rsqrt(mean(x**2) + eps)`` per row and ``u = g * weight`` for the output
    gradient ``g``: ``dx = r * (u - x * r**2 * sum(u * x) / H)`` (Zhang and Sennrich 2019, "Root
    Mean Square Layer Normalization", differentiated).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        rstd = rstd.square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        scaled = grad_output * weight  # u
        coef = torch.linalg.vecdot(scaled, x).unsqueeze(-1)  # sum(u * x), [..., 1]
        coef.mul_(rstd.square()).div_(x.shape[-1])
        return torch.addcmul(scaled, x, coef, value=-1).mul_(rstd), None, None


class _FusedRMSNorm:
    """Mixed into a transformers RMSNorm class: the forward of :class:`RMSNormFunction` where it
    applies (float32 input and weight, frozen weight), the class's own otherwise."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (hidden_states.dtype != torch.float32 or weight.dtype != torch.float32
                or weight.requires_grad):
            return super().forward(hidden_states)
        return RMSNormFunction.apply(hidden_states, weight, self.variance_epsilon)


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (_FusedRMSNorm, cls), {})
    return _FUSED_CLASSES[cls]


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def _computes_the_same(module: torch.nn.Module) -> bool:
    """Whether :class:`RMSNormFunction` equals ``module``'s own forward on a random input."""
    generator = torch.Generator().manual_seed(0)
    weight = module.weight
    x = torch.randn(3, weight.numel(), generator=generator).to(weight.device) * 3
    with torch.no_grad():
        expected = type(module).forward(module, x.to(weight.dtype)).float()
        actual = RMSNormFunction.apply(x, weight.float(), module.variance_epsilon)
    return torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Switch every RMSNorm layer of ``model`` that computes ``weight * x * rsqrt(mean(x**2) +
    eps)`` to :class:`RMSNormFunction`, in place.

    A layer is recognized by its class name (``*RMSNorm``), a 1-D ``weight`` and a float
    ``variance_epsilon``, and switched only if its own forward agrees with the fused one on a
    random input (a variant such as Gemma's ``(1 + weight)`` scaling is left alone).

    Returns:
        How many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, _FusedRMSNorm):
            continue
        if _is_rms_norm(module) and _computes_the_same(module):
            module.__class__ = _fused_class(type(module))
            switched += 1
    return switched
