"""LoRA on the experts of a mixture-of-experts layer, in Tinker's adapter layout.

transformers 5 keeps the experts of a sparse MLP layer (Qwen3-MoE's ``Qwen3MoeExperts``, and every
experts class built with its ``@use_experts_implementation`` decorator in the same layout) as two
fused parameters: ``gate_up_proj [E, 2I, H]`` (each expert's gate rows first, then its up rows)
and ``down_proj [E, H, I]``, with ``E`` experts, hidden size ``H`` and expert width ``I``.
:class:`ExpertLora` wraps such a module as a PEFT tuner layer (through PEFT's custom-module hook,
``LoraConfig._register_custom_module``) and adds one LoRA pair per projection.

Key layout (Tinker's; adapters from the local engine, ``tinkerkit serve`` and the hosted service
are interchangeable). Per layer ``i`` and projection, one 3-D pair::

    base_model.model.model.layers.{i}.mlp.experts.{w1|w3|w2}.lora_A.weight   [E or 1, r, in]
    base_model.model.model.layers.{i}.mlp.experts.{w1|w3|w2}.lora_B.weight   [E or 1, out, r]

``w1`` is the gate projection, ``w3`` the up projection, ``w2`` the down projection (the names of
Mixtral's and Tinker's experts). Tinker's scheme is "shared outer": the factor on the hidden-size
side has leading dimension 1 and is shared by all experts, the other one is per expert::

    w1, w3 (in = H, out = I):  lora_A [1, r, H]   lora_B [E, I, r]
    w2     (in = I, out = H):  lora_A [E, r, I]   lora_B [1, H, r]

and expert ``e``'s weight change is ``ΔW_e = (alpha / r) · B_e · A_e``
(:func:`tinkerkit.engines.local.model.lora_delta`, a leading 1 broadcast). Learned from the public
tinker-cookbook's ``merge_tinker_adapter_to_hf_model.py`` (which expands the factor of leading
dimension 1 to all experts); written here anew. In a model, the parameters are named
``...experts.w1.default.lora_A.weight`` (PEFT's adapter name ``default`` inside), saved without
it, as PEFT saves its own.

Computation: on the tokens routed to expert ``e``, ``y_e = x · W_eᵀ + s · (x · A_eᵀ) · B_eᵀ``,
without materializing ``W_e + ΔW_e``: the tokens are sorted by expert and every per-expert product
is one grouped matrix product (``torch.nn.functional.grouped_mm``, or a loop over the experts
where that kernel does not apply). A factor shared by all experts is applied outside the grouped
products: ``x · A₀ᵀ`` of w1 and w3 once per token (not once per routed copy), ``z · B₀ᵀ`` of w2
once over all routed copies. The extra cost is about ``tokens × r × (H + I)`` multiply-adds per
projection. Gradients reach the LoRA factors only (the base parameters stay frozen); an expert that
receives no token gets zero gradients. Routing is the model's own (the router, ``mlp.gate``, is
never adapted).

Example::

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "experts"])
    config._register_custom_module({Qwen3MoeExperts: partial(ExpertLora, delta=lora_delta)})
    model = get_peft_model(model, config)    # what tinkerkit's wrap_lora does
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from tinkerkit.engines.local.kernels.lora_linear import autocast_weight

EXPERT_PROJECTIONS = ("w1", "w3", "w2")
"""Tinker's names of the expert projections: gate (``w1``), up (``w3``), down (``w2``)."""


def experts_layout_problem(module: torch.nn.Module) -> str | None:
    """Why :class:`ExpertLora` cannot adapt ``module``, or None when it can.

    It can adapt an experts module in transformers 5's fused layout: 3-D parameters
    ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows; not interleaved, not transposed) and
    ``down_proj [E, H, I]``, no biases, ``act(gate) * up`` gating, no norm after the experts.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3):
        return "no fused 3-D gate_up_proj and down_proj parameters"
    experts, two_width, hidden = gate_up.shape
    if two_width % 2 or tuple(down.shape) != (experts, hidden, two_width // 2):
        return (f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} are not "
                "[E, 2I, H] and [E, H, I]")
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    for flag, expected in flags.items():
        if getattr(module, flag, expected) != expected:
            return f"{flag}={getattr(module, flag)} (supported: {expected})"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return "a custom gating function (_apply_gate)"
    if not callable(getattr(module, "act_fn", None)):
        return "no act_fn"
    return None


class LoraFactor(torch.nn.Module):
    """One LoRA factor of the experts, as a module so that its parameter is named ``weight``.

    Args:
        shape: ``[E or 1, r, in]`` for ``lora_A``, ``[E or 1, out, r]`` for ``lora_B``.
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(shape))


class ExpertLoraPair(torch.nn.Module):
    """The LoRA pair of one expert projection: ``lora_A [E or 1, r, in]``, ``lora_B [E or 1,
    out, r]`` (float32; ``lora_A`` drawn as PEFT draws a linear layer's, ``lora_B`` zero).

    ``lora_A`` is PEFT's ``kaiming_uniform_(a=sqrt(5))`` for each expert's ``[r, in]`` matrix
    (fan-in ``in``: uniform in ``±1/sqrt(in)``), drawn from torch's global RNG.
    """

    def __init__(self, experts_a: int, experts_b: int, rank: int, in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.lora_A = LoraFactor(experts_a, rank, in_features)
        self.lora_B = LoraFactor(experts_b, out_features, rank)
        with torch.no_grad():  # a [E*r, in] view: fan-in is `in`, as for PEFT's [r, in] matrix
            torch.nn.init.kaiming_uniform_(self.lora_A.weight.view(-1, in_features),
                                           a=math.sqrt(5))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward pass hands on a contiguous gradient (``grouped_mm``'s backward
    refuses the stride-0 gradients of a broadcast, e.g. after ``sum``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    """Whether ``t``'s address and non-unit strides are multiples of 16 bytes, as
    ``grouped_mm``'s kernels require."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        stride * size % 16 == 0 for stride, extent in zip(t.stride(), t.shape)
        if stride != 1 and extent > 1)


def _grouped_mm_applies(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm(x, weight_t)`` runs forward and backward: both
    operands and the output's rows (the backward pass's gradient) 16-byte aligned, on the CPU
    (torch >= 2.10 has a kernel for every float dtype) or on a CUDA device of compute capability
    8.0 or newer in bfloat16."""
    out_row_bytes = weight_t.shape[-1] * weight_t.element_size()
    if not (hasattr(torch.nn.functional, "grouped_mm") and _aligned(x) and _aligned(weight_t)
            and out_row_bytes % 16 == 0):
        return False
    if x.device.type == "cpu":
        return True
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int],
                   offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by expert, each group times its expert's weight transposed.

    One ``torch.nn.functional.grouped_mm`` where it runs (:func:`_grouped_mm_applies`), else one
    matrix product per expert that has rows.

    Args:
        x: ``[S, in]``, rows sorted by expert: ``counts[e]`` rows for expert ``e`` in order.
        weight: ``[E, out, in]``, of ``x``'s dtype.
        counts: Rows per expert (``E`` ints summing to ``S``; zeros allowed).
        offsets: int32 ``[E]``, the cumulative sums of ``counts`` on ``x``'s device.

    Returns:
        ``[S, out]``: row ``j`` of group ``e`` is ``x[j] @ weight[e].T``. Differentiable in ``x``
        and ``weight``.
    """
    weight_t = weight.transpose(-2, -1)
    if _grouped_mm_applies(x, weight_t):
        return _ContiguousGrad.apply(torch.nn.functional.grouped_mm(x, weight_t, offs=offsets))
    pieces = [rows @ w_t for rows, w_t in zip(x.split(counts), weight_t.unbind(0)) if len(rows)]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


class ExpertLora(torch.nn.Module, BaseTunerLayer):
    """A PEFT tuner layer: an experts module (see :func:`experts_layout_problem`) with a LoRA pair
    on each of its gate (``w1``), up (``w3``) and down (``w2``) projections, in Tinker's "shared
    outer" layout (module docstring).

    Built by PEFT (``custom_cls(target, adapter_name, config=..., r=..., lora_alpha=...)``). One
    adapter per model (tinkerkit's ``default``). The layer's parameters are
    ``{w1|w3|w2}.<adapter>.lora_A.weight`` / ``lora_B.weight``; the base module stays
    ``base_layer``.

    Args:
        base_layer: The experts module.
        adapter_name: PEFT's adapter name.
        config: The ``LoraConfig`` (``lora_dropout``; DoRA, LoRA biases and other variants are
            refused).
        r: LoRA rank.
        lora_alpha: LoRA alpha; the scaling is ``lora_alpha / r``.
        delta: The weight change of a pair, ``delta(lora_A, lora_B, scaling) -> [E, out, in]``
            float32 (:func:`tinkerkit.engines.local.model.lora_delta`, which registers this
            layer with ``functools.partial``), used by :meth:`merge`.

    Raises:
        ValueError: The module's layout is not supported, or the config asks for a LoRA
            variant this layer does not implement (PEFT's custom layers raise ValueError too).
    """

    adapter_layer_names = EXPERT_PROJECTIONS
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, *, config: Any,
                 r: int, lora_alpha: float,
                 delta: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                 **kwargs: Any) -> None:
        super().__init__()
        problem = experts_layout_problem(base_layer)
        if problem is not None:
            raise ValueError(f"LoRA on {type(base_layer).__name__}: {problem}")
        for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if getattr(config, option, False):
                raise ValueError(f"LoRA on experts does not support {option}=True")
        self.base_layer, self._delta = base_layer, delta
        self.num_experts, two_width, self.hidden_size = base_layer.gate_up_proj.shape
        self.intermediate_size = two_width // 2
        for name in EXPERT_PROJECTIONS:
            setattr(self, name, torch.nn.ModuleDict())
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config.lora_dropout)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float,
                     lora_dropout: float) -> None:
        """Add the LoRA pairs of ``adapter_name`` (Tinker's layout, float32, on the base
        parameters' device)."""
        if self.r:
            raise ValueError("LoRA on experts holds one adapter per model")
        experts, hidden, width = self.num_experts, self.hidden_size, self.intermediate_size
        device = self.base_layer.gate_up_proj.device
        shapes = {"w1": (1, experts, hidden, width), "w3": (1, experts, hidden, width),
                  "w2": (experts, 1, width, hidden)}
        for name, (experts_a, experts_b, fan_in, fan_out) in shapes.items():
            pair = ExpertLoraPair(experts_a, experts_b, r, fan_in, fan_out)
            getattr(self, name)[adapter_name] = pair.to(device)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = lora_dropout
        self.set_adapter([adapter_name])

    # -- merging

    def _deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        return {name: self._delta(getattr(self, name)[adapter].lora_A.weight.detach(),
                                  getattr(self, name)[adapter].lora_B.weight.detach(),
                                  self.scaling[adapter]) for name in EXPERT_PROJECTIONS}

    def _add_deltas(self, adapter: str, sign: float, safe_merge: bool) -> None:
        base, width = self.base_layer, self.intermediate_size
        deltas = self._deltas(adapter)
        gate_up = base.gate_up_proj.detach().float()
        gate_up[:, :width] += sign * deltas["w1"]  # gate rows first, then up rows
        gate_up[:, width:] += sign * deltas["w3"]
        down = base.down_proj.detach().float() + sign * deltas["w2"]
        if safe_merge and not (torch.isfinite(gate_up).all() and torch.isfinite(down).all()):
            raise ValueError(f"NaNs detected in the merged expert weights. The adapter "
                             f"{adapter} seems to be broken")
        with torch.no_grad():
            base.gate_up_proj.copy_(gate_up)
            base.down_proj.copy_(down)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add each expert's ``ΔW_e`` to the base parameters (float32 arithmetic, one cast to
        their dtype): w1 to ``gate_up_proj[:, :I]``, w3 to ``gate_up_proj[:, I:]``, w2 to
        ``down_proj``.

        Raises:
            ValueError: ``safe_merge`` and a merged value is NaN or infinite (nothing changed).
        """
        for adapter in adapter_names or self.active_adapters:
            if adapter in self.r and adapter not in self.merged_adapters:
                self._add_deltas(adapter, 1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ``ΔW_e`` again (up to rounding in the base dtype)."""
        while self.merged_adapters:
            self._add_deltas(self.merged_adapters.pop(), -1.0, False)

    # -- forward

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output with LoRA, for the router's choice.

        Args:
            hidden_states: ``[T, H]``.
            top_k_index: int64 ``[T, k]``, the experts each token is routed to.
            top_k_weights: ``[T, k]``, their routing weights.

        Returns:
            ``[T, H]`` in ``hidden_states``' dtype: ``sum_j weight_j · expert_{index_j}(x)``.
        """
        adapters = [a for a in self.active_adapters if a in self.r]
        if self.disable_adapters or self.merged or not adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return self._lora_forward(adapters[0], hidden_states, top_k_index, top_k_weights)

    def _operands(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Base weights (cast once per value, see ``autocast_weight``) and LoRA factors (cast
        under autograd, so that their gradients stay float32) in the compute dtype."""
        base = self.base_layer
        weights = [autocast_weight(w, dtype) if w.dtype != dtype else w
                   for w in (base.gate_up_proj, base.down_proj)]
        factors = [getattr(getattr(self, name)[adapter], part).weight.to(dtype)
                   for name in EXPERT_PROJECTIONS for part in ("lora_A", "lora_B")]
        return (*weights, *factors)

    def _lora_forward(self, adapter: str, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        device = hidden_states.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden_states.dtype
        with torch.autocast(device, enabled=False):
            out = self._routed(adapter, hidden_states.to(dtype), top_k_index,
                               top_k_weights.to(dtype), dtype)
        return out.to(hidden_states.dtype)

    def _routed(self, adapter: str, x: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        gate_up, down, a1, b1, a3, b3, a2, b2 = self._operands(adapter, dtype)
        scaling, width = self.scaling[adapter], self.intermediate_size
        dropout = self.lora_dropout[adapter] if self.training else 0.0
        tokens, top_k = top_k_index.shape
        # Sort the S = tokens * k (token, expert) pairs by expert; stable, so deterministic.
        experts = top_k_index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        counts_t = torch.bincount(experts, minlength=self.num_experts)
        counts = counts_t.tolist()  # one device sync per layer
        offsets = counts_t.cumsum(0).to(torch.int32)
        rows = order // top_k
        routed = x[rows]  # [S, H]

        # Gate and up: base products per expert; the shared A of w1 and w3 once per token.
        lora_in = torch.nn.functional.dropout(x, dropout) if dropout else x
        down_13 = (lora_in @ torch.cat([a1[0], a3[0]]).t())[rows]  # [S, 2r]
        rank = a1.shape[1]
        projected = grouped_linear(routed, gate_up, counts, offsets)  # [S, 2I]
        gate = projected[:, :width] + scaling * grouped_linear(down_13[:, :rank], b1, counts,
                                                               offsets)
        up = projected[:, width:] + scaling * grouped_linear(down_13[:, rank:], b3, counts,
                                                             offsets)
        hidden = self.base_layer.act_fn(gate) * up  # [S, I]

        # Down: the per-expert A of w2 grouped, its shared B once over all pairs.
        lora_hidden = torch.nn.functional.dropout(hidden, dropout) if dropout else hidden
        down_2 = grouped_linear(lora_hidden, a2, counts, offsets)  # [S, r]
        output = grouped_linear(hidden, down, counts, offsets) + scaling * (down_2 @ b2[0].t())
        output = output * top_k_weights.reshape(-1)[order, None]  # [S, H]
        # Back to (token, slot) order, then the sum over a token's k experts.
        unsorted = output[torch.argsort(order)]
        return unsorted.view(tokens, top_k, -1).sum(1)
