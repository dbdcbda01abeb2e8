"""Tinker's loss functions, on the learner's log-probabilities of the target tokens: one home.

Every loss is a sum over tokens of a term in ``target_logprobs`` (the learner's
``log p(target_tokens[t] | tokens[:t+1])``, float32, computed by
:func:`tinkerkit.engines.local.kernels.logprobs.token_logprobs`) and the datum's
``loss_fn_inputs``. The formulas and the input and config names are those of Tinker's loss
documentation (https://tinker-docs.thinkingmachines.ai/tinker/losses): with ``logprobs`` the
sampler's log-probabilities (an input), ``ratio = exp(target_logprobs - logprobs)`` and
``A = advantages``,

* ``cross_entropy``: ``sum(weights * -target_logprobs)`` (``weights`` optional, all ones when
  absent; negative weights allowed: ``forward_backward_custom`` sends ``-d loss/d logprobs``);
* ``importance_sampling``: ``-sum(ratio * A)``;
* ``ppo``: ``-sum(min(ratio * A, clip(ratio, low, high) * A))``;
* ``cispo``: ``-sum(stopgrad(clip(ratio, low, high)) * target_logprobs * A)``;
* ``dro``: ``-sum(target_logprobs * A - beta / 2 * (target_logprobs - logprobs) ** 2)``.

``low``/``high`` are the ``loss_fn_config`` keys ``clip_low_threshold``/``clip_high_threshold``,
``beta`` the key ``beta``; which keys each loss takes, their defaults and ranges are
:mod:`tinkerkit.loss_rules`.

For ``importance_sampling``, ``ppo`` and ``cispo`` a token with ``A == 0`` adds exactly 0 (even
where ``ratio`` would overflow: prompt tokens carry no sampler log-probability). ``dro``'s
penalty applies wherever ``beta != 0``, on every token, as Tinker's formula reads: a prompt
token should carry the sampler's log-probability there, or lie outside the datum's targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tinkerkit.errors import EngineError
from tinkerkit.loss_rules import resolve_loss_config

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float]


@dataclass(frozen=True)
class LossFunction:
    """One of Tinker's losses: what it reads and how it is computed.

    Attributes:
        name: Tinker's ``loss_fn`` string.
        inputs: ``loss_fn_inputs`` it requires besides ``target_tokens`` (float ``[T]`` each).
        optional_inputs: Float inputs it accepts when present, with the value of each
            position when absent.
        summed: ``(target_logprobs, inputs, config) -> loss``: float32 tensors of one shape
            (``[T]`` or ``[B, T]``; padding positions 0 in every input and in
            ``target_logprobs`` add 0), a float32 scalar.
        needs_grad: ``(inputs, config) -> bool mask``: the positions whose
            ``target_logprobs`` the loss depends on (the others need no gradient).
    """

    name: str
    inputs: tuple[str, ...]
    optional_inputs: Mapping[str, float]
    summed: Callable[[torch.Tensor, Inputs, Config], torch.Tensor]
    needs_grad: Callable[[Inputs, Config], torch.Tensor]


def cross_entropy(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``sum(weights * -target_logprobs)``."""
    return -(target_logprobs * inputs["weights"]).sum()


def _ratio(target_logprobs: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return torch.exp(target_logprobs - inputs["logprobs"])


def _where_advantage(inputs: Inputs, term: torch.Tensor) -> torch.Tensor:
    """``term`` where the advantage is non-zero, exactly 0 elsewhere (no ``inf * 0``)."""
    return torch.where(inputs["advantages"] != 0, term, torch.zeros_like(term))


def importance_sampling(target_logprobs: torch.Tensor, inputs: Inputs,
                        config: Config) -> torch.Tensor:
    """``-sum(ratio * advantages)``: REINFORCE with an importance-sampling correction."""
    term = _ratio(target_logprobs, inputs) * inputs["advantages"]
    return -_where_advantage(inputs, term).sum()


def ppo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-sum(min(ratio * A, clip(ratio, low, high) * A))`` (Schulman et al., 2017)."""
    ratio, advantages = _ratio(target_logprobs, inputs), inputs["advantages"]
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    term = torch.minimum(ratio * advantages, clipped * advantages)
    return -_where_advantage(inputs, term).sum()


def cispo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-sum(stopgrad(clip(ratio, low, high)) * target_logprobs * A)`` (MiniMax-M1's CISPO)."""
    coefficient = _ratio(target_logprobs, inputs).detach().clamp(
        config["clip_low_threshold"], config["clip_high_threshold"])
    term = coefficient * target_logprobs * inputs["advantages"]
    return -_where_advantage(inputs, term).sum()


def dro(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """``-sum(target_logprobs * A - beta / 2 * (target_logprobs - logprobs) ** 2)``
    (Richemond et al., 2024)."""
    penalty = (target_logprobs - inputs["logprobs"]) ** 2
    return -(target_logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty).sum()


def _weighted(inputs: Inputs, config: Config) -> torch.Tensor:
    return inputs["weights"] != 0


def _advantaged(inputs: Inputs, config: Config) -> torch.Tensor:
    return inputs["advantages"] != 0


def _dro_grad(inputs: Inputs, config: Config) -> torch.Tensor:
    if config["beta"] != 0:
        return torch.ones_like(inputs["advantages"], dtype=torch.bool)
    return inputs["advantages"] != 0


_RL_INPUTS = ("logprobs", "advantages")
LOSSES: dict[str, LossFunction] = {loss.name: loss for loss in (
    LossFunction("cross_entropy", (), {"weights": 1.0}, cross_entropy, _weighted),
    LossFunction("importance_sampling", _RL_INPUTS, {}, importance_sampling, _advantaged),
    LossFunction("ppo", _RL_INPUTS, {}, ppo, _advantaged),
    LossFunction("cispo", _RL_INPUTS, {}, cispo, _advantaged),
    LossFunction("dro", _RL_INPUTS, {}, dro, _dro_grad),
)}
"""The losses of the local engine (and ``tinkerkit serve``), by Tinker's ``loss_fn`` name."""


def resolve_loss(loss_fn: str, loss_fn_config: Mapping[str, object] | None
                 ) -> tuple[LossFunction, dict[str, float]]:
    """The loss named ``loss_fn`` and its config with the defaults filled in.

    Args:
        loss_fn: Tinker's loss name (a key of :data:`LOSSES`).
        loss_fn_config: ``loss_fn_config`` as the SDK sends it (str -> number), or None.

    Raises:
        EngineError: An unknown loss, or a config :func:`~tinkerkit.loss_rules.resolve_loss_config`
            refuses (an unknown key, a value not a finite number or out of its range).
    """
    loss = LOSSES.get(loss_fn)
    if loss is None:
        raise EngineError(f"loss_fn '{loss_fn}' is not supported by the local engine; "
                          f"supported: {', '.join(LOSSES)}")
    try:
        return loss, resolve_loss_config(loss_fn, loss_fn_config)
    except ValueError as e:
        raise EngineError(str(e)) from None


def datum_inputs(index: int, loss: LossFunction, given: Mapping[str, object],
                 length: int) -> dict[str, torch.Tensor]:
    """Datum ``index``'s float ``loss_fn_inputs`` for ``loss``, as float32 ``[length]`` tensors.

    Args:
        index: The datum's position in the request (for messages).
        loss: The loss it goes to.
        given: The datum's ``loss_fn_inputs`` (``tinker.types.TensorData`` values);
            ``target_tokens`` is read elsewhere.
        length: The datum's number of input tokens.

    Raises:
        EngineError: A required input missing, an input the loss does not take, one whose
            shape is not ``[length]``, or a non-finite value (named by datum and field).
    """
    where = f"datum {index}"
    accepted = {"target_tokens", *loss.inputs, *loss.optional_inputs}
    for name in given:
        if name not in accepted:
            raise EngineError(f"{where}: loss_fn_inputs['{name}'] is not an input of "
                              f"{loss.name} (it takes {', '.join(sorted(accepted))})")
    tensors = {}
    for name in (*loss.inputs, *loss.optional_inputs):
        if name not in given:
            if name in loss.inputs:
                raise EngineError(f"{where}: loss_fn_inputs['{name}'] is missing ({loss.name} "
                                  f"needs {', '.join(('target_tokens', *loss.inputs))})")
            tensors[name] = torch.full((length,), loss.optional_inputs[name])
            continue
        tensor = given[name].to_torch().to(torch.float32)
        if tensor.shape != (length,):
            raise EngineError(f"{where}: loss_fn_inputs['{name}'] has shape "
                              f"{list(tensor.shape)}, model_input has [{length}]")
        if not torch.isfinite(tensor).all():
            raise EngineError(f"{where}: loss_fn_inputs['{name}'] holds a non-finite value")
        tensors[name] = tensor
    return tensors
