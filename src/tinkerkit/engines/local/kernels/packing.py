"""Padding-free micro-batches: datums packed end to end into one row, attention kept within each.

A right-padded micro-batch of ``B`` datums costs ``B * max(T_i)`` token positions in every linear
layer; packed end to end into a single row, it costs ``sum(T_i)``, and the matrix products run on
one larger ``[sum(T_i), hidden]`` operand. Each datum keeps its own positions (``position_ids``
restart at 0, so rotary embeddings are those of the datum alone) and its own causal attention:
the attention function below runs PyTorch's ``scaled_dot_product_attention`` once per datum
(``is_causal=True``, no mask), so no token attends to another datum and no ``[T, T]`` mask or
score matrix over the packed row is built. Results equal the padded micro-batch's up to float
summation order.

The attention function is registered with transformers' ``AttentionInterface`` (and transformers'
SDPA mask function under the same name), and a model is switched to it with
:func:`enable_packing`. Called without segment lengths it is transformers' SDPA attention
unchanged, so the same model still samples with left-padded attention masks.

Packing applies to models on transformers' SDPA attention path whose every layer attends
causally over the whole sequence: sliding-window layers (Mistral, Gemma) or logit soft-capping
(Gemma 2) would need more than one causal kernel per datum, so those models keep padded
micro-batches (:func:`supports_packing`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tinkerkit.errors import EngineError

PACKED_ATTENTION = "tinkerkit_packed_sdpa"
"""The name :func:`packed_sdpa_attention` is registered under."""
SEGMENTS_KWARG = "tinkerkit_segments"
"""The decoder keyword argument that carries the packed datums' lengths to the attention layers."""


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run once per packed datum when segment lengths are given.

    Args:
        module: The attention layer (transformers passes itself).
        query: ``[B, heads, T, head_dim]``; ``key``, ``value``: ``[B, kv_heads, T, head_dim]``.
        attention_mask: transformers' mask; ignored for a packed row (each datum is causal on
            its own), passed on otherwise.
        kwargs: transformers' attention arguments (``dropout``, ``scaling``, ...) and, for a
            packed row, ``tinkerkit_segments``: the datums' lengths (ints summing to ``T``).

    Returns:
        ``([B, T, heads, head_dim], None)``, as transformers' attention functions return.

    Raises:
        EngineError: A packed row reached a layer with sliding-window attention or logit
            soft-capping, which one causal kernel per datum would not compute.
    """
    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise EngineError(f"packed micro-batches reached an attention layer with {name}="
                              f"{kwargs[name]}; this model needs padded micro-batches")
    kwargs.pop("is_causal", None)
    pieces = zip(query.split(segments, 2), key.split(segments, 2), value.split(segments, 2))
    outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
               for q, k, v in pieces]
    return torch.cat(outputs, 1), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a transformers ``*ForCausalLM``) can run packed micro-batches.

    True when it dispatches attention through transformers' ``AttentionInterface``, uses the SDPA
    implementation (or already the packed one), and no layer has sliding-window attention or
    logit soft-capping.
    """
    config = model.config
    if config._attn_implementation == PACKED_ATTENTION:
        return True
    if config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = any(kind != "full_attention" for kind in layer_types)
    else:
        sliding = getattr(config, "sliding_window", None) is not None
    return not sliding and getattr(config, "attn_logit_softcapping", None) is None


def enable_packing(model: torch.nn.Module) -> bool:
    """Switch ``model`` to :func:`packed_sdpa_attention` if :func:`supports_packing`.

    Returns:
        Whether the model now runs packed micro-batches.
    """
    if not supports_packing(model):
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def packed_positions(lengths: list[int]) -> torch.Tensor:
    """int64 ``[1, sum(lengths)]`` position ids restarting at 0 for each packed datum."""
    return torch.cat([torch.arange(n) for n in lengths])[None]
