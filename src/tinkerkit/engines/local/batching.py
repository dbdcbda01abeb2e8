"""Datums into micro-batches for the local engine: validation, packing and padding plans.

A ``forward_backward`` call's datums are validated once (:func:`to_example`) and cut into
micro-batches of at most ``microbatch_tokens`` tokens, one pass through the model each:

* packed (:func:`plan_packs`, :meth:`MicroBatch.packed`): the datums end to end in one row,
  without padding, each with its own positions and attending only within itself
  (:mod:`tinkerkit.engines.local.kernels.packing`);
* padded (:func:`plan_padded`, :meth:`MicroBatch.padded`), for models that cannot pack: right
  padding, the datums sorted by length and cut where padding would cost more than another pass.
  Right padding needs no attention mask under causal attention (no real token attends to a
  later pad).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from tinker import types

from tinkerkit.engines.local.kernels.packing import packed_positions
from tinkerkit.engines.local.losses import LOSSES, LossFunction, datum_inputs
from tinkerkit.errors import EngineError

MICROBATCH_OVERHEAD_TOKENS = 64
"""What one more micro-batch costs, in padded tokens (another pass through the model in Python,
smaller matrix products); :func:`plan_padded` trades it against padding."""


@dataclass
class Example:
    """One validated datum: int64 ``tokens``/``targets``, all ``[T]``, and the loss's float32
    ``inputs`` (``weights``, ``advantages``, ...; each ``[T]``)."""

    index: int
    tokens: torch.Tensor
    targets: torch.Tensor
    inputs: dict[str, torch.Tensor]


def to_example(index: int, datum: types.Datum, vocab_size: int,
               loss: LossFunction = LOSSES["cross_entropy"]) -> Example:
    """Validate datum ``index`` for ``loss`` and convert it to tensors.

    Raises:
        EngineError: Non-token chunks, an empty input, missing ``target_tokens``, a length
            that differs from ``model_input``'s, a token id outside ``[0, vocab_size)``, or a
            float input the loss needs missing, misshapen or non-finite, or one it does not
            take (:func:`~tinkerkit.engines.local.losses.datum_inputs`; the message names the
            datum and the field).
    """
    where = f"datum {index}"
    try:
        tokens = torch.tensor(datum.model_input.to_ints(), dtype=torch.int64)
    except ValueError as e:
        raise EngineError(f"{where}: model_input holds non-token chunks: {e}") from e
    inputs = datum.loss_fn_inputs
    if "target_tokens" not in inputs:
        raise EngineError(f"{where}: loss_fn_inputs['target_tokens'] is missing")
    targets = inputs["target_tokens"].to_torch().to(torch.int64)
    if tokens.numel() == 0:
        raise EngineError(f"{where}: model_input is empty")
    if targets.shape != tokens.shape:
        raise EngineError(f"{where}: loss_fn_inputs['target_tokens'] has shape "
                          f"{list(targets.shape)}, model_input has [{tokens.numel()}]")
    for field, tensor in (("model_input", tokens), ("target_tokens", targets)):
        if tensor.min() < 0 or tensor.max() >= vocab_size:
            raise EngineError(f"{where}: {field} holds a token id outside [0, {vocab_size})")
    return Example(index, tokens, targets, datum_inputs(index, loss, inputs, len(tokens)))


def plan_padded(examples: list[Example], budget: int) -> list[list[Example]]:
    """Right-padded micro-batches that waste little on padding (models that cannot pack).

    The datums are sorted longest first and cut into runs of consecutive ones; of all such
    cuts, the one with the fewest padded tokens plus :data:`MICROBATCH_OVERHEAD_TOKENS` per
    micro-batch is taken (dynamic programming over the cut points, ``O(n^2)`` for ``n``
    datums). A micro-batch holds at most ``budget`` padded tokens, or a single datum.
    """
    ordered = sorted(examples, key=lambda e: -len(e.tokens))
    cost = [0.0] + [math.inf] * len(ordered)  # cost[i]: the best cut of ordered[:i]
    start_of = [0] * (len(ordered) + 1)  # start_of[i]: where the last micro-batch begins
    for end in range(1, len(ordered) + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * len(ordered[start].tokens)
            if padded > budget and end - start > 1:
                break
            candidate = cost[start] + padded + MICROBATCH_OVERHEAD_TOKENS
            if candidate < cost[end]:
                cost[end], start_of[end] = candidate, start
    batches, end = [], len(ordered)
    while end:
        batches.append(ordered[start_of[end]:end])
        end = start_of[end]
    return batches[::-1]


def plan_packs(examples: list[Example], budget: int) -> list[list[Example]]:
    """Packed micro-batches: the datums in order, each pack filled while it holds at most
    ``budget`` tokens (a datum longer than ``budget`` runs alone)."""
    packs: list[list[Example]] = []
    filled = budget
    for example in examples:
        if filled + len(example.tokens) > budget:
            packs.append([])
            filled = 0
        packs[-1].append(example)
        filled += len(example.tokens)
    return packs


@dataclass
class MicroBatch:
    """The model inputs of one pass.

    ``tokens``/``targets`` int64 and ``valid`` bool (False on padding), all ``[B, T]``;
    ``inputs``: the loss's float32 inputs by name, each ``[B, T]`` (0 on padding); for a packed
    row (``B == 1``) ``segments``, the datums' lengths, else None;
    ``places``: each datum with its row and first position.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor
    segments: list[int] | None
    places: list[tuple[Example, int, int]]

    @property
    def position_ids(self) -> torch.Tensor | None:
        """int64 ``[1, T]`` positions restarting at 0 per packed datum; None for padded rows."""
        return None if self.segments is None else packed_positions(self.segments)

    @classmethod
    def padded(cls, batch: list[Example]) -> MicroBatch:
        length = max(len(e.tokens) for e in batch)
        return cls(_pad([e.tokens for e in batch], length, torch.int64),
                   _pad([e.targets for e in batch], length, torch.int64),
                   {name: _pad([e.inputs[name] for e in batch], length, torch.float32)
                    for name in batch[0].inputs},
                   _pad([torch.ones(len(e.tokens), dtype=torch.bool) for e in batch], length,
                        torch.bool),
                   None, [(example, row, 0) for row, example in enumerate(batch)])

    @classmethod
    def packed(cls, batch: list[Example]) -> MicroBatch:
        lengths = [len(e.tokens) for e in batch]
        starts = [0, *itertools.accumulate(lengths)][:-1]
        tokens = torch.cat([e.tokens for e in batch])[None]
        return cls(tokens, torch.cat([e.targets for e in batch])[None],
                   {name: torch.cat([e.inputs[name] for e in batch])[None]
                    for name in batch[0].inputs},
                   torch.ones_like(tokens, dtype=torch.bool), lengths,
                   [(example, 0, start) for example, start in zip(batch, starts)])


def _pad(rows: list[torch.Tensor], length: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out

