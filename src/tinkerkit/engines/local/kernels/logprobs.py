"""Log-probabilities of target tokens without a ``[positions, vocab]`` tensor for the whole input.

The decoder's last hidden states are projected to the vocabulary in chunks of
:func:`logit_chunk_positions` positions (at most :data:`LOGIT_CHUNK_ELEMENTS` logits alive at
once): the one chunk rule of the local engine, for training, ``forward`` and a sampler's prompt
log-probabilities alike. A frozen output projection computes each position's gradient row while
the chunk's logits are at hand (:class:`FrozenHeadLogprobs`); a trainable one (``train_unembed``)
recomputes each chunk in the backward pass (``torch.utils.checkpoint``).
"""

from __future__ import annotations

import threading

import torch

from tinkerkit.engines.local.kernels.lora_linear import autocast_weight, low_precision_rows
from tinkerkit.engines.local.kernels.packing import SEGMENTS_KWARG

LOGIT_CHUNK = 1024
"""Most positions projected to the vocabulary at once."""
LOGIT_CHUNK_ELEMENTS = 1 << 25
"""Most logits alive at once in the loss: 2**25 float32 values (128 MiB), i.e. 220 positions of
Qwen's 151,936-entry vocabulary or 682 of SmolLM2's 49,152. Smaller chunks cost speed (more,
thinner matrix products), larger ones memory."""


def last_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None,
                       segments: list[int] | None = None) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of the decoder, without the vocabulary projection.

    ``segments``: the lengths of the datums packed into the single row of ``input_ids`` (a
    model switched to packed attention, :mod:`tinkerkit.engines.local.kernels.packing`), or None.
    ``model`` is a causal LM or a ``PeftModel`` (which hands ``get_decoder`` and
    ``get_output_embeddings`` on to the model inside; the kernels do not import
    :mod:`tinkerkit.engines.local.model`, which imports them).
    """
    decoder = model.get_decoder()
    packed = {} if segments is None else {SEGMENTS_KWARG: segments}
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False, **packed)
    return out.last_hidden_state


_WORKSPACE = threading.local()


def logits_workspace(rows: int, vocab: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """A ``[rows, vocab]`` block of ``dtype`` for one chunk's logits, kept by the calling thread.

    The block is reused by every later chunk and step of the same thread (a training client's
    worker, a sampler's thread) instead of being allocated anew: a block of logits is larger than
    what the C allocator keeps for reuse, so a fresh one is mapped from the kernel each time and
    every page is faulted in and zeroed again (about a third of the frozen head's time under bf16
    on a CPU; docs/PERFORMANCE.md). One block per dtype and device is kept per thread, grown to
    the largest request (at most :data:`LOGIT_CHUNK_ELEMENTS` elements where the chunk rule
    applies); it is freed with the thread.
    """
    blocks = _WORKSPACE.__dict__.setdefault("blocks", {})
    key = (dtype, device)
    block = blocks.get(key)
    if block is None or block.numel() < rows * vocab:
        block = blocks[key] = torch.empty(rows * vocab, dtype=dtype, device=device)
    return block[:rows * vocab].view(rows, vocab)


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [chunk, vocab]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class FrozenHeadLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[targets]`` per position, chunked, for a frozen head.

    Position ``n``'s log-probability depends on ``hidden[n]`` alone, so its gradient is the row
    ``J[n] = weight[targets[n]] - softmax(logits[n]) @ weight`` (``[H]``; the gradient of
    log-softmax). The forward pass computes ``J`` chunk by chunk while the chunk's logits are at
    hand, and the backward pass is ``grad_output[:, None] * J``: two matrix products per chunk, as
    for full logits, and never more than one ``[chunk, vocab]`` block alive.

    Inputs: ``hidden`` ``[N, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]`` or None (not
    trainable), ``targets`` int64 ``[N]``, ``chunk`` positions per block. Output: float32 ``[N]``.

    Under autocast the two matrix products run in the autocast dtype, with the weight's cast
    kept (:func:`~tinkerkit.engines.local.kernels.lora_linear.autocast_weight`) rather than
    redone for every chunk; the log-softmax is float32 (logits rounded to bf16 carry a relative
    error of 2^-9, as under autocast in any model), and ``weight[targets]`` uses the float32 rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        logprobs = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        device = hidden.device.type
        product_weight, product_bias = weight, bias
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            product_weight = autocast_weight(weight, dtype)
            product_bias = None if bias is None else autocast_weight(bias, dtype)
        positions, vocab = len(hidden), weight.shape[0]
        low = product_weight.dtype != torch.float32
        if low:  # rows padded on the CPU so that the products' shapes repeat (ROW_BLOCK)
            hidden = low_precision_rows(hidden, product_weight.dtype)
        with torch.autocast(device, enabled=False):
            for start in range(0, positions, chunk):
                rows = slice(start, start + chunk)
                count = min(chunk, positions - start)
                logits = logits_workspace(count, vocab, torch.float32, hidden.device)
                products = (logits_workspace(min(chunk, len(hidden) - start), vocab,
                                             product_weight.dtype, hidden.device)
                            if low else logits)
                torch.mm(hidden[rows], product_weight.t(), out=products)
                if product_bias is not None:
                    products.add_(product_bias)
                if low:
                    logits.copy_(products[:count])
                picked = logits.gather(-1, targets[rows, None]).squeeze(-1)
                # logsumexp and softmax from one exp, in place of the logits
                peak = logits.amax(-1, keepdim=True)
                exp = logits.sub_(peak).exp_()
                total = exp.sum(-1, keepdim=True)
                logprobs[rows] = picked - (peak + total.log()).squeeze(-1)
                if jacobian is not None:
                    probs = exp.div_(total)
                    if low:  # the padding rows' products are computed and dropped
                        products[:count].copy_(probs)
                        probs = products
                    jacobian[rows] = (weight[targets[rows]].float()
                                      - (probs @ product_weight)[:count].float())
        ctx.save_for_backward(jacobian)
        ctx.hidden_dtype = hidden.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        (jacobian,) = ctx.saved_tensors
        grad_hidden = (grad_output[:, None] * jacobian).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def _project(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
             chunk: int) -> torch.Tensor:
    """float32 ``[N]`` log-probabilities of ``targets`` (``[N]``) under ``head(hidden)``.

    A frozen ``nn.Linear`` head (the usual case) goes through :class:`FrozenHeadLogprobs`; a
    trainable one (LoRA on ``lm_head``) through autograd, one chunk at a time inside
    ``torch.utils.checkpoint`` (the backward pass recomputes each chunk's logits).
    """
    frozen = isinstance(head, torch.nn.Linear) and not any(p.requires_grad
                                                           for p in head.parameters())
    if frozen:
        return FrozenHeadLogprobs.apply(hidden, head.weight, head.bias, targets, chunk)
    pieces = [torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False)
              if torch.is_grad_enabled() else _chunk_logprobs(head, h, t)
              for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def logit_chunk_positions(vocab_size: int) -> int:
    """Positions per vocabulary projection: :data:`LOGIT_CHUNK_ELEMENTS` logits, at most
    :data:`LOGIT_CHUNK` positions, at least one."""
    return max(1, min(LOGIT_CHUNK, LOGIT_CHUNK_ELEMENTS // vocab_size))


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   chunk: int | None = None, *, grad_mask: torch.Tensor | None = None,
                   valid_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None,
                   segments: list[int] | None = None) -> torch.Tensor:
    """``log p(targets[b, t] | input_ids[b, :t+1])`` without materializing ``[B, T, vocab]``.

    The decoder runs once; its last hidden states are projected to the vocabulary ``chunk``
    positions at a time (:func:`_project`). With gradients on, only the positions in
    ``grad_mask`` are projected under autograd; the other valid positions are projected without
    it (their log-probabilities carry no gradient) and padding not at all. The results are
    those of ``log_softmax(model(input_ids).logits)`` up to float summation order, in values and
    gradients.

    Args:
        model: A causal LM (``PeftModel`` or transformers ``*ForCausalLM``).
        input_ids: int64 ``[B, T]``; right padding only (no attention mask is used).
        targets: int64 ``[B, T]``, valid token ids (padding positions any valid id).
        chunk: Positions per vocabulary projection; None: :func:`logit_chunk_positions`.
        grad_mask: bool ``[B, T]``: positions whose log-probabilities need gradients (those the
            loss weights); None: every valid position.
        valid_mask: bool ``[B, T]``: positions to compute at all (False on padding, which comes
            back as 0); None: every position.
        position_ids: int64 ``[B, T]``, or None for ``0 .. T-1`` in every row.
        segments: Lengths of the datums packed into the single row (``B == 1``), each attending
            only within itself (:mod:`tinkerkit.engines.local.kernels.packing`); None: one sequence per row.

    Returns:
        float32 ``[B, T]`` log-probabilities.
    """
    hidden = last_hidden_states(model, input_ids, position_ids=position_ids, segments=segments)
    batch, length, width = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    head = model.get_output_embeddings()
    chunk = chunk or logit_chunk_positions(head.out_features)
    valid = (torch.ones_like(flat_targets, dtype=torch.bool) if valid_mask is None
             else valid_mask.reshape(-1).to(hidden.device))
    graded = torch.zeros_like(valid)
    if torch.is_grad_enabled():
        graded = valid if grad_mask is None else valid & grad_mask.reshape(-1).to(hidden.device)
    out = torch.zeros(batch * length, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        rows = (valid & ~graded).nonzero().squeeze(1)
        out[rows] = _project(head, flat_hidden[rows], flat_targets[rows], chunk)
    rows = graded.nonzero().squeeze(1)
    if rows.numel():
        out = out.index_put((rows,), _project(head, flat_hidden[rows], flat_targets[rows], chunk))
    return out.reshape(batch, length)

