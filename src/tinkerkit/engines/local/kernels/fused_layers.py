"""RMSNorm and rotary embeddings with hand-written backward passes: fewer passes over the
activations than autograd's.

transformers' RMSNorm layers (Llama, Qwen2, Qwen3, Mistral, ...) compute
``weight * x / sqrt(mean(x**2) + eps)`` as six elementwise and reduction operations, and autograd
differentiates each of them, so one layer makes about a dozen passes over a ``[tokens, hidden]``
tensor; on a CPU these memory-bound passes cost about as much as a small matrix product.
:class:`RMSNormFunction` computes the same function with one reduction and two multiplications,
and its gradient with respect to ``x`` (the weight is frozen under LoRA) with three more passes,
equal to transformers' within float rounding. Likewise the rotary position embedding
(``x * cos + rotate_half(x) * sin``: a multiplication, a negation, a concatenation, another
multiplication and a sum, each differentiated by autograd) is :class:`RotaryFunction`: one
multiplication and two in-place multiply-adds on the halves, forward and backward. What each
bought is in ``docs/PERFORMANCE.md``.

:func:`fuse_layers` switches a model's RMSNorm layers and the attention layers of the Llama
family (Llama, Qwen2, Qwen3, Mistral, ...) to them, each only after checking on a random input
that the layer computes what its own forward does; otherwise (a trained norm weight, inputs that
are not float32, a KV cache) the layer's own forward runs.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class RMSNormFunction(torch.autograd.Function):
    """``weight * x * rsqrt(mean(x**2, -1) + eps)`` with a frozen ``weight``.

    Inputs: ``x`` float32 ``[..., H]``; ``weight`` float32 ``[H]`` (no gradient is returned for
    it); ``eps`` a float; ``out_dtype`` the output's dtype (computed in float32 and rounded once:
    bfloat16 under autocast, where the next layers are matrix products that autocast would cast
    the float32 output for, once per layer). Output: ``out_dtype`` ``[..., H]``; the gradient of
    ``x`` is float32 whatever ``out_dtype`` is.

    Backward, with ``r = rsqrt(mean(x**2) + eps)`` per row and ``u = g * weight`` for the output
    gradient ``g``: ``dx = r * (u - x * r**2 * sum(u * x) / H)`` (Zhang and Sennrich 2019, "Root
    Mean Square Layer Normalization", differentiated).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        rstd = rstd.square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        if out_dtype == torch.float32:
            return (x * rstd).mul_(weight)
        return torch.mul(x * rstd, weight, out=torch.empty_like(x, dtype=out_dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        scaled = grad_output * weight  # u, float32
        with torch.autocast(x.device.type, enabled=False):  # float32 whatever the caller's mode
            coef = torch.linalg.vecdot(scaled, x).unsqueeze(-1)  # sum(u * x), [..., 1]
        coef.mul_(rstd.square()).div_(x.shape[-1])
        return torch.addcmul(scaled, x, coef, value=-1).mul_(rstd), None, None, None


class _FusedRMSNorm:
    """Mixed into a transformers RMSNorm class: the forward of :class:`RMSNormFunction` where it
    applies (float32 input and weight, frozen weight), the class's own otherwise. Under autocast
    the output is in the autocast dtype (the matrix products that read it would cast it)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (hidden_states.dtype != torch.float32 or weight.dtype != torch.float32
                or weight.requires_grad):
            return super().forward(hidden_states)
        device = hidden_states.device.type
        out_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else torch.float32)
        return RMSNormFunction.apply(hidden_states, weight, self.variance_epsilon, out_dtype)


class RotaryFunction(torch.autograd.Function):
    """Rotary position embedding ``x * cos + rotate_half(x) * sin``, ``rotate_half(x) =
    cat(-x2, x1)`` for the halves ``x1``, ``x2`` of the last dimension (Su et al. 2021,
    "RoFormer", eq. 34, in transformers' half-split layout).

    Inputs: ``x`` ``[B, heads, T, D]``; ``cos``, ``sin`` ``[B, 1, T, D]`` (not differentiated), all
    of one dtype. Output: ``[B, heads, T, D]``. Backward: ``dx = g * cos`` plus ``-g1 * sin1`` on
    the second half and ``g2 * sin2`` on the first (the transpose of the rotation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad_output.shape[-1] // 2
        grad = grad_output * cos
        grad[..., half:].addcmul_(grad_output[..., :half], sin[..., :half], value=-1)
        grad[..., :half].addcmul_(grad_output[..., half:], sin[..., half:])
        return grad, None, None


class _FusedRotaryAttention:
    """Mixed into a Llama-family attention class: the same forward with :class:`RotaryFunction`
    for the rotary embedding, where it applies (no KV cache; queries of the embeddings' dtype);
    the class's own forward otherwise."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs):
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        if cache is not None or cos is None or kwargs.get("past_key_values") is not None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache,
                                   **kwargs)
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads)
        key = self.k_proj(hidden_states).view(heads)
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3: RMSNorm per head before the rotation
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        # The rotation runs in float32 (the fused LoRA layers' outputs are float32 under
        # autocast too; others are cast). On the CPU the attention runs in float32 as well,
        # where PyTorch's flash-attention backward pass is faster than in bf16 (1.7x on
        # SmolLM2's packed datums; docs/PERFORMANCE.md); on a GPU autocast runs it in bf16.
        device = hidden_states.device.type
        if query.dtype != cos.dtype:
            query, key, value = query.to(cos.dtype), key.to(cos.dtype), value.to(cos.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query, key = RotaryFunction.apply(query, cos, sin), RotaryFunction.apply(key, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        if getattr(self, "sliding_window", None) is not None:
            kwargs["sliding_window"] = self.sliding_window
        with torch.autocast("cpu", enabled=False) if device == "cpu" else nullcontext():
            output, weights = attention(self, query, key, value, attention_mask,
                                        dropout=self.attention_dropout if self.training else 0.0,
                                        scaling=self.scaling, **kwargs)
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(output), weights


_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(mixin: type, cls: type) -> type:
    if (mixin, cls) not in _FUSED_CLASSES:
        _FUSED_CLASSES[mixin, cls] = type(f"Fused{cls.__name__}", (mixin, cls), {})
    return _FUSED_CLASSES[mixin, cls]


def _is_rms_norm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_llama_attention(module: torch.nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config",
             "attention_dropout")
    return (type(module).__name__.endswith("Attention") and all(hasattr(module, n) for n in names)
            and module.config._attn_implementation in ALL_ATTENTION_FUNCTIONS)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two outputs of a layer agree up to float rounding: the largest difference is at
    most 1e-4 of the largest output. (Per-element tolerances reject layers whose outputs reach
    ~100, as deep attention layers' do, for rounding differences of 1e-4 in elements near zero.)"""
    if actual.shape != expected.shape:
        return False
    return bool((actual - expected).abs().max() <= 1e-4 * expected.abs().max())


def _own_output(module: torch.nn.Module, *inputs) -> torch.Tensor:
    """``module``'s own forward (its class's) on ``inputs``, in eval mode, without gradients."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            output = type(module).forward(module, *inputs)
    finally:
        module.train(training)
    return output[0] if isinstance(output, tuple) else output


def _norm_is_fusable(module: torch.nn.Module, generator: torch.Generator) -> bool:
    weight = module.weight
    if weight.dtype != torch.float32:
        return False
    x = torch.randn(3, weight.numel(), generator=generator).to(weight.device) * 3
    with torch.no_grad():
        fused = RMSNormFunction.apply(x, weight, module.variance_epsilon)
    return _close(fused, _own_output(module, x))


def _attention_is_fusable(module: torch.nn.Module, generator: torch.Generator) -> bool:
    weight = module.q_proj.weight
    if weight.dtype != torch.float32:
        return False
    length, device = 5, weight.device
    hidden = torch.randn(1, length, module.config.hidden_size, generator=generator).to(device)
    angles = torch.randn(1, length, module.head_dim, generator=generator).to(device)
    inputs = (hidden, (angles.cos(), angles.sin()), None)
    expected = _own_output(module, *inputs)
    own = type(module)
    module.__class__ = _fused_class(_FusedRotaryAttention, own)
    try:
        actual = _own_output(module, *inputs)
    except Exception:  # the fused forward does not fit this layer: keep its own
        return False
    finally:
        module.__class__ = own
    return _close(actual, expected)


def fuse_layers(model: torch.nn.Module) -> dict[str, int]:
    """Switch ``model``'s RMSNorm layers to :class:`RMSNormFunction` and its Llama-family
    attention layers to :class:`RotaryFunction`, in place.

    A layer is recognized by its class name (``*RMSNorm`` with a 1-D ``weight`` and a float
    ``variance_epsilon``; ``*Attention`` with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and
    switched only if the fused forward agrees with its own on a random float32 input (a
    variant, such as Gemma's ``(1 + weight)`` scaling, is left alone). The switched classes are
    subclasses of the original ones (``isinstance`` holds; state dicts are unchanged).

    Returns:
        How many layers were switched: ``{"rms_norm": n, "attention": m}``.
    """
    generator = torch.Generator().manual_seed(0)
    switched = {"rms_norm": 0, "attention": 0}
    for module in list(model.modules()):
        if isinstance(module, (_FusedRMSNorm, _FusedRotaryAttention)):
            continue
        if _is_rms_norm(module) and _norm_is_fusable(module, generator):
            module.__class__ = _fused_class(_FusedRMSNorm, type(module))
            switched["rms_norm"] += 1
        elif _is_llama_attention(module) and _attention_is_fusable(module, generator):
            module.__class__ = _fused_class(_FusedRotaryAttention, type(module))
            switched["attention"] += 1
    return switched
